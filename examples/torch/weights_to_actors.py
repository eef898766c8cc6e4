"""A trainer publishes a torch model's weights; actor processes act on the newest version, zero copy.

    python examples/torch/weights_to_actors.py [--actors 2] [--steps 200]

The trainer fits a small ``nn.Sequential`` and publishes its ``state_dict()``
to a ``shmring.SharedState`` every few steps (one copy of the tensors into a
free slot, then one atomic store).  Each actor pins the newest version and runs
its own model on the weights where they lie in shared memory
(``torch.func.functional_call`` over the received tensors: no copy, no
``load_state_dict``), under ``torch.inference_mode()``.  The weights are
read-only by contract: torch has no read-only tensors, and a write would
change the published version for every reader (README, "torch tensors").
At the end, each actor's output for the last version is checked against the
trainer's.
"""
import argparse
import multiprocessing
import os

import torch

import shmring

PROBE = torch.linspace(-2, 2, 16).reshape(-1, 1)


def model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def actor(state: shmring.SharedState, results) -> None:
    net = model()                                   # its own parameters are never used
    seen, last, out = 0, 0, None
    with state, torch.inference_mode():
        while True:
            try:
                version = state.wait_newer(than=last, timeout=30)
            except shmring.EndOfStream:             # the trainer closed: no more versions
                break
            with state.read() as snap:              # pinned: this version cannot change under us
                w = snap.value
                out = torch.func.functional_call(net, w["model"], (PROBE,))
                step = w["step"]
                last = snap.version
                del w
            seen += 1
    results.put((os.getpid(), seen, last, step, out.tolist()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=10, help="publish every N steps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.linspace(-2, 2, 256).reshape(-1, 1)
    y = torch.sin(2 * x)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with shmring.SharedState.anonymous(1 << 20, slots=4) as state:
        state.publish({"step": 0, "model": net.state_dict()})
        actors = [ctx.Process(target=actor, args=(state, results)) for _ in range(args.actors)]
        for p in actors:
            p.start()
        for step in range(1, args.steps + 1):
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.every == 0 or step == args.steps:
                v = state.publish({"step": step, "model": net.state_dict()})
                if step % (args.every * 5) == 0:
                    print(f"trainer: step {step}, loss {loss.item():.4f}, published version {v}", flush=True)
        final = state.version
    # closing the writer ends the actors' wait_newer() with EndOfStream
    with torch.no_grad():
        want = net(PROBE).tolist()
    ok = 0
    for _ in actors:
        pid, seen, last, step, out = results.get(timeout=60)
        match = last == final and out == want
        ok += match
        print(f"actor {pid}: acted on {seen} versions, last version {last} (step {step}), "
              f"{'output matches the trainer' if match else 'OUTPUT DIFFERS'}", flush=True)
    for p in actors:
        p.join(30)
    print(f"{ok} of {len(actors)} actors match the final weights")


if __name__ == "__main__":
    main()
