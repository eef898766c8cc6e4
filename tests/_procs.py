"""Starting and joining child processes in the cross-process tests."""

JOIN = 180          # bound on any child's life in these tests; reaching it is a hang, not slowness


def start(procs, ctx, target, *args):
    """Start ``target(*args)`` in a daemon child of context ``ctx``, tracked by the ``procs`` fixture."""
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def finish(p, timeout=JOIN):
    """Join a child; a child still alive after ``timeout`` is a hang and fails the test."""
    p.join(timeout)
    assert not p.is_alive(), f"child {p.name} hung"
    return p.exitcode
