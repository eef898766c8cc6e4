"""A producer sends pandas DataFrames through a ring as Arrow IPC; a consumer aggregates them in place.

    python examples/arrow/dataframes.py [--frames 20] [--rows 200000]

The producer (a child process) sends each ``DataFrame`` (``send(df)``: it
travels as ``pyarrow.Table.from_pandas(df)`` written as an Arrow IPC stream
straight into the ring, one copy) followed by pandas' own group sums of it.
The consumer receives the frame as a ``pyarrow.Table`` whose buffers are the
ring's memory (``send`` of a Table arrives as a Table; here the producer sends
``Table.from_pandas`` so the consumer can stay in Arrow), aggregates it with
``Table.group_by`` without copying it, and checks the sums against pandas'.
"""
import argparse
import multiprocessing

import numpy as np
import pandas as pd
import pyarrow as pa

import shmring


def frame(k: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(k)
    return pd.DataFrame({"city": rng.choice(["Lyon", "Oslo", "Pune", "Lima"], rows),
                         "amount": rng.integers(0, 1000, rows), "price": rng.random(rows)})


def producer(ring: shmring.Ring, frames: int, rows: int) -> None:
    with ring, ring.producer() as prod:
        for k in range(frames):
            df = frame(k, rows)
            prod.send(pa.Table.from_pandas(df, preserve_index=False), timeout=60)   # zero copy at the receiver
            sums = df.groupby("city")["amount"].sum()
            prod.send({"frame": k, "sums": {c: int(s) for c, s in sums.items()}}, timeout=60)
        prod.send(df, timeout=60)            # a DataFrame arrives as a DataFrame


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    with shmring.Ring.anonymous(1 << 25) as ring, ring.consumer() as cons:
        child = ctx.Process(target=producer, args=(ring, args.frames, args.rows))
        child.start()
        good = rows = 0
        for k in range(args.frames):
            with cons.recv(timeout=60) as msg:
                table = msg.value                               # a pyarrow.Table over the ring
                agg = table.group_by("city").aggregate([("amount", "sum")])
                mine = dict(zip(agg["city"].to_pylist(), agg["amount_sum"].to_pylist()))
                rows += table.num_rows
                del table, agg                                  # the views die with the message
            check = cons.recv(timeout=60, copy=True)
            good += check["frame"] == k and check["sums"] == mine
        last = cons.recv(timeout=60, copy=True)
        child.join(60)
        print(f"received {args.frames} frames, {rows:,} rows; group sums match pandas in {good} of "
              f"{args.frames}; last message: a {type(last).__name__} of {len(last):,} rows")


if __name__ == "__main__":
    main()
