# process B (examples/tour/consumer.py): start it before or after process A
import sys

import shmring

name = sys.argv[1] if sys.argv[1:] else "tour"
ring = shmring.Ring.attach(name, wait=60)            # waits up to 60 s for A to create it
ring.unlink()                                        # the name goes; our mapping stays valid
with ring.consumer() as cons:
    data = cons.recv_bytes(timeout=5)                # copy out a bytes message, released at once
    with cons.recv(timeout=5) as msg:                # a zero-copy window on the shared pages
        print(msg.kind, msg.value.sum())             # array 66.0: a read-only ndarray view
    obj = cons.recv(copy=True, timeout=5)            # a detached copy of the next value
    for msg in cons:                                 # until the producer closes the stream
        with msg:
            print(msg.kind, msg.nbytes)              # array 307256 (encoded), then bytes 1
ring.close()
print("consumer:", data, obj["id"], obj["img"].shape)    # b'raw bytes' 7 (480, 640)
