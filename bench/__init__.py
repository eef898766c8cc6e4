"""shmring benchmarks: shmring against its peers, side by side, in one run.

Run from the repository root::

    python -m bench            # full run (a few minutes)
    python -m bench --quick    # under two minutes
    python -m bench --only pingpong

See bench/README.md for what each workload measures and how to read the table.
"""
