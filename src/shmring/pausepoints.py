"""Test-only pause points: a no-op in normal use.

A fault-injection or interleaving test sets :data:`hook` to a callable taking
the point's name; shmring calls it at the named step, so the test can stop a
process there (and kill it), or hold one thread there while another runs, then
let it go on.  Called only on slow paths (ring creation, attach, reservation
commit, joins, leaves and recovery steps), never from the C per-message path.

Points: ``create``, ``attach``, ``reserved`` (ring.py); ``drop_subscriber``
(a dead subscriber's entry is taken over, its position not yet freed),
``skip_scanned`` (the intents are scanned, the skip not yet written),
``requeue_walked`` (an mpmc recovery has taken the orphaned entries over, not
yet walked and requeued), ``producer_claim`` / ``producer_claimed`` (a
producer before it claims a table entry / after, not yet joined),
``producer_ended`` (close(): its counters bumped, its end not yet stored),
``producer_counted`` (close() / detach(): its end or leave stored, the entry
not yet given back) (parties.py); ``replace_opened`` (``create(...,
replace_dead=True)`` has opened the old segment, not yet locked it) (segment.py).  The C core's own pause points are
set with ``shmring._core._set_pause_hook``.
"""
hook = None


def pause(point: str) -> None:
    h = hook
    if h is not None:
        h(point)
