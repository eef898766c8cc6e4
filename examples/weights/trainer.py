"""Terminal 1: publish model weights (~20 MB) to the shared state "weights-example" at 10 Hz.

    python examples/weights/trainer.py [--seconds 30] [--hz 10] [--mb 20]

Every step is a copy-on-write update: the current weights are copied once into
a free version slot, changed in place there (a stand-in for an optimizer step:
every weight grows by 1.0), and published atomically.  Actors reading older
versions are never disturbed and never block the trainer.  Unlinks the state
on exit (actors still attached keep their mapping).
"""
import argparse
import time

import numpy as np

import shmring

NAME = "weights-example"
LAYERS = 5


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to train")
    ap.add_argument("--hz", type=float, default=10.0, help="versions published per second")
    ap.add_argument("--mb", type=float, default=20.0, help="size of the weights in MB")
    args = ap.parse_args(argv)
    rows = max(1, int(args.mb * 1e6 / (LAYERS * 1000 * 4)))
    weights = {"step": np.zeros(1, np.int64),
               "layers": [np.full((rows, 1000), float(i), np.float32) for i in range(LAYERS)]}
    nbytes = sum(a.nbytes for a in weights["layers"]) + 4096
    with shmring.SharedState.create(NAME, nbytes, slots=4, replace_dead=True) as state:
        state.publish(weights)
        print(f"trainer: {NAME!r} created, {nbytes / 1e6:.1f} MB per version, {state.slots} slots; "
              "start actors", flush=True)
        period, t_next, end = 1.0 / args.hz, time.monotonic(), time.monotonic() + args.seconds
        step, cost = 0, 0.0
        while time.monotonic() < end:
            t_next += period
            t0 = time.perf_counter()
            with state.update(timeout=10) as w:            # one memcpy of the current version
                w["step"][0] += 1
                for layer in w["layers"]:
                    layer += 1.0                           # the "optimizer step", in place
            cost += time.perf_counter() - t0
            step += 1
            if step % 10 == 0:
                st = state.stats()
                print(f"trainer: published version {state.version} (step {step}), "
                      f"{cost / step * 1e3:.1f} ms per update, pins per slot {st['pins']}", flush=True)
            time.sleep(max(0.0, t_next - time.monotonic()))
        st = state.stats()
        print(f"trainer: done after {step} steps, last version {state.version}, "
              f"{st['readers']} readers attached, {st['reclaimed_pins']} pins reclaimed", flush=True)


if __name__ == "__main__":
    main()
