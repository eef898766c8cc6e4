"""Record a camera-like stream into a file, then replay it into another ring.

    python examples/record/record_and_replay.py [--frames 100] [--file /tmp/cam.rec]
"""
import argparse
import os
import threading
import zlib

import numpy as np

import shmring
from shmring import recordfile
from shmring.record import record, replay


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--file", default=f"/tmp/shmring-example-{os.getpid()}.rec")
    a = ap.parse_args(argv)
    sums = []
    with shmring.Ring.create(f"rec-example-{os.getpid()}", 1 << 24) as cam:
        out = {}
        t = threading.Thread(target=lambda: out.update(record(cam, a.file, crc=True, overwrite=True)))
        t.start()
        with shmring.Ring.attach(cam.name) as cam2, cam2.producer() as prod:
            for i in range(a.frames):
                frame = np.random.default_rng(i).integers(0, 255, (120, 160), dtype=np.uint8)
                sums.append(zlib.crc32(frame.tobytes()))
                prod.send({"seq": i, "frame": frame})
        t.join()
    print(f"recorded {out['messages']} messages, {out['bytes']} bytes; {out['end']}")
    with recordfile.open_file(a.file) as f:
        print(f.summary())
    got = []
    with shmring.Ring.create(f"replay-example-{os.getpid()}", 1 << 24) as again:
        cons = again.consumer()
        t = threading.Thread(target=replay, args=(a.file, again), kwargs={"speed": None})
        t.start()
        for msg in cons:
            with msg:
                got.append(zlib.crc32(msg.value["frame"].tobytes()))
        t.join()
        cons.close()
    os.unlink(a.file)
    print(f"replayed {len(got)} frames, checksums {'match' if got == sums else 'DIFFER'}")
    return 0 if got == sums else 1


if __name__ == "__main__":
    raise SystemExit(main())
