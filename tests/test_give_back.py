"""msg.give_back(): done with a message without consuming it (R39's path,
whatever was looked at).  Across processes it is attacked by
tests/test_record_failures.py (a recorder whose write fails)."""
import pytest

import shmring


@pytest.mark.parametrize("kind", ["spsc", "mpsc", "mpmc", "broadcast"])
def test_a_message_given_back_is_received_again_even_after_it_was_read(ring_name, kind):
    with shmring.Ring.create(ring_name, 1 << 16, kind=kind) as ring:
        cons = ring.subscribe("oldest") if kind == "broadcast" else ring.consumer()
        with ring.producer() as prod:
            for i in range(3):
                prod.send(bytes([i]) * 8)
        m = cons.recv(timeout=5)
        assert bytes(m.value) == b"\0" * 8 and m.nbytes == 8         # handed over: a drop would release it
        assert m.give_back() is True and m.released
        with cons.recv(timeout=5) as again:
            assert bytes(again.value) == b"\0" * 8
        assert [bytes(x.value)[0] for x in cons] == [1, 2]
        cons.close()


def test_give_back_with_a_live_view_releases_and_says_so(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.consumer() as cons:
        with ring.producer() as prod:
            prod.send(b"a" * 8)
            prod.send(b"b" * 8)
        m = cons.recv(timeout=5)
        view = memoryview(m)
        with pytest.warns(shmring.EscapedViewWarning):
            assert m.give_back() is False                 # released as by release(): deferred while the view lives
        view.release()
        with cons.recv(timeout=5) as nxt:
            assert bytes(nxt.value) == b"b" * 8
        assert m.give_back() is False                     # already released: nothing to give back


def test_a_message_given_back_then_the_handle_closed_goes_to_the_next_consumer(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring:
        with ring.producer() as prod:
            prod.send(b"x" * 8)
            prod.send(b"y" * 8)
        with ring.consumer() as c1:
            m = c1.recv(timeout=5)
            m.tobytes()
            m.give_back()
        with ring.consumer() as c2:
            assert [x.tobytes() for x in c2] == [b"x" * 8, b"y" * 8]
