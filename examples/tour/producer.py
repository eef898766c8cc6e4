# process A (examples/tour/producer.py): start it before or after process B
import sys

import numpy as np
import shmring

name = sys.argv[1] if sys.argv[1:] else "tour"
ring = shmring.Ring.create(name, 1 << 26, replace_dead=True)   # /dev/shm/shmring.tour; replace_dead:
#   one left over by a killed run is replaced (never one a live process uses)
with ring.producer() as prod:
    prod.send(b"raw bytes")                          # bytes-like  -> bytes message
    prod.send(np.arange(12.0).reshape(3, 4))         # ndarray     -> array message (one memcpy)
    prod.send({"id": 7, "img": np.zeros((480, 640), np.uint8)})   # msgpack, arrays travel raw
    with prod.reserve_array((480, 640), np.uint8) as out:         # build in place: no copy at all
        out[:] = 255                                 # committed on exit, aborted on exception
    prod.try_send(b"x")                              # False if the ring is full right now
# leaving the producer block ends the stream: B gets what was sent, then the end
ring.close()               # detach; the name stays for B, which unlinks it once attached
print("producer: sent 5 messages")
