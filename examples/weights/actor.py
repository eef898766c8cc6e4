"""Terminal 2 (and 3, 4, ...): act on the latest weights of "weights-example", read in place.

    python examples/weights/actor.py [--seconds 30] [--wait 30]

Each action pins the newest version (one C call), reads the weights as
read-only zero-copy views, and unpins (one C call).  The pinned version never
changes under the actor however often the trainer publishes, which the actor
checks: in a consistent version every layer's weights equal their initial
value plus the step number.  Prints each new version it acts on.
"""
import argparse
import os
import time

import shmring

NAME = "weights-example"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to act")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the trainer")
    args = ap.parse_args(argv)
    me = os.getpid()
    with shmring.SharedState.attach(NAME, wait=args.wait) as state:
        state.wait_newer(than=0, timeout=args.wait)
        end = time.monotonic() + args.seconds
        acted, versions, bad, last = 0, 0, 0, 0
        t0 = time.monotonic()
        while time.monotonic() < end:
            with state.read() as snap:                     # pin: the version cannot change under us
                w = snap.value
                step = int(w["step"][0])
                # the "policy": touch one weight per layer; check the version is consistent
                ok = all(layer[0, 0] == i + step and layer[-1, -1] == i + step
                         for i, layer in enumerate(w["layers"]))
                version = snap.version
                del w
            acted += 1
            bad += not ok
            if version != last:
                versions += 1
                if versions % 10 == 1:
                    rate = acted / max(1e-9, time.monotonic() - t0)
                    print(f"actor {me}: acting on version {version} (step {step}), "
                          f"{rate:,.0f} actions/s", flush=True)
                last = version
        print(f"actor {me}: {acted} actions on {versions} versions, {bad} inconsistent", flush=True)


if __name__ == "__main__":
    main()
