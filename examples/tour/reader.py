# reader process (examples/tour/reader.py): start it before or after the writer
import sys

import shmring

name = sys.argv[1] if sys.argv[1:] else "weights"
state = shmring.SharedState.attach(name, wait=60)   # waits up to 60 s for the writer to create it
state.unlink()                           # the name goes; our mapping stays valid
v = 0
while True:
    with state.read() as snap:           # pins the current version: never torn, never blocks the writer
        print("version", snap.version, "w[3, 0] =", snap.value["w"][3, 0])   # zero-copy, valid in the block
        v = snap.version
    try:
        v = state.wait_newer(than=v, timeout=5)      # futex sleep until a newer version
    except shmring.EndOfStream:          # the writer closed: no newer version will come
        break
print("reader: last version", v)
state.close()
