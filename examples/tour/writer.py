# writer process (examples/tour/writer.py): start it before or after the reader
import sys
import time

import numpy as np
import shmring

name = sys.argv[1] if sys.argv[1:] else "weights"
state = shmring.SharedState.create(name, 32 << 20, slots=4, replace_dead=True)  # as in producer.py
state.publish({"step": 0, "w": np.zeros((1000, 1000), np.float32)})
for step in range(1, 6):
    time.sleep(0.1)
    with state.update() as draft:        # a writable copy of the current value in a free slot
        draft["w"][3] += 1.0             # published atomically on exit, discarded on exception
state.close()    # readers' waits end (EndOfStream) once they have the last version; the name stays
print("writer: published 6 versions")
