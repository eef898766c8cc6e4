"""Terminal 2: attach to the ring "stream-example" and print what arrives.

    python examples/stream/consumer.py

Waits up to --wait seconds for the producer to create the ring, then receives
zero-copy views until the producer closes the stream.
"""
import argparse

import shmring

NAME = "stream-example"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the producer")
    args = ap.parse_args(argv)
    ring = shmring.Ring.attach(NAME, wait=args.wait)
    frames = bad = 0
    with ring.consumer() as cons:
        print(f"consumer: attached to {NAME!r}")
        for msg in cons:                                  # until the producer closes
            with msg:
                if msg.kind == "array":
                    frame = msg.value                     # read-only view of the shared pages
                    if not (frame == frames).all():
                        bad += 1
                    frames += 1
                    del frame                             # views must not outlive the message
                else:
                    obj = msg.copy()                      # detached copy, safe to keep
                    if "hello" in obj:
                        print(f"consumer: producer says hello, {obj['count']} frames coming")
                    elif obj["seq"] % 50 == 0:
                        print(f"consumer: seq {obj['seq']}, stats {obj['stats'].tolist()}")
    ring.close()
    print(f"consumer: end of stream after {frames} frames, {bad} bad")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
