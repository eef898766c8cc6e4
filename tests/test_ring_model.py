"""Property test: random interleavings of sends, aborted and shrunk
reservations, receives and out-of-order releases on every ring kind, checked
against a model (a FIFO per reader).  In one process, so hypothesis can shrink
a failure to a short sequence; the cross-process tests cover real concurrency."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmring

KINDS = ["spsc", "mpsc", "broadcast", "mpmc"]
N_PROD = {"spsc": 1, "mpsc": 2, "broadcast": 1, "mpmc": 2}
N_CONS = {"spsc": 1, "mpsc": 1, "broadcast": 2, "mpmc": 2}

ops = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.integers(0, 700)),
    st.tuples(st.just("abort"), st.integers(0, 1), st.integers(0, 700)),
    st.tuples(st.just("shrink"), st.integers(0, 1), st.integers(0, 700)),
    st.tuples(st.just("recv"), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.just("release"), st.integers(0, 1), st.integers(0, 7)),
), max_size=120)


def body(tag, seq, size):
    return (bytes([tag]) + seq.to_bytes(4, "little") + bytes([seq % 251]) * size)[:max(size, 5)]


@pytest.mark.parametrize("kind", KINDS)
@settings(deadline=None, max_examples=150, suppress_health_check=list(HealthCheck))
@given(script=ops)
def test_random_operations_match_a_fifo_model(kind, script):
    name = f"model-{kind}-{np.random.randint(1 << 30)}"
    with shmring.Ring.create(name, 4096, kind=kind) as ring:
        prods = [ring.producer() for _ in range(N_PROD[kind])]
        cons = [ring.consumer() for _ in range(N_CONS[kind])]
        sent = []                                   # every committed message, in commit order
        seq = 0
        held = [[] for _ in cons]                   # messages received, not released
        got = [[] for _ in cons]                    # bytes received, per consumer
        for op, who, arg in script:
            if op in ("send", "abort", "shrink"):
                p = prods[who % len(prods)]
                data = body(who, seq, arg)
                if op == "send":
                    if p.try_send(data):
                        sent.append(data)
                        seq += 1
                    continue
                try:
                    r = p.reserve(len(data) + 40, timeout=0)
                except shmring.Timeout:
                    continue
                if op == "abort":
                    r.abort()
                else:
                    r.view[:len(data)] = data
                    r._nbytes = len(data)
                    r.commit()
                    sent.append(data)
                    seq += 1
            elif op == "recv":
                i = who % len(cons)
                for _ in range(arg + 1):
                    m = cons[i].try_recv()
                    if m is None:
                        break
                    got[i].append(m.tobytes())
                    held[i].append(m)
            else:
                i = who % len(cons)
                if held[i]:
                    held[i].pop(arg % len(held[i])).release()
        for i, c in enumerate(cons):                # release everything, then drain
            for m in held[i]:
                m.release()
            while (m := c.try_recv()) is not None:
                got[i].append(m.tobytes())
                m.release()
        if kind == "mpmc":
            # each message to exactly one consumer; each consumer sees them in commit order
            assert sorted(got[0] + got[1]) == sorted(sent)
            for g in got:
                assert g == [s for s in sent if s in set(g)]
        else:
            for g in got:                            # every reader: everything, in commit order
                assert g == sent
        for h in prods + cons:
            h.close()
