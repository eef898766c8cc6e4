"""Issue 16 case 10: small things a new user trips on."""
import subprocess
import sys

import numpy as np
import pytest

import shmring


@pytest.mark.parametrize("handle", ["producer", "consumer", "state"])
def test_raw_word_accessors_are_not_public_on_handles(handle, ring_name):
    if handle == "state":
        h = shmring.SharedState.create(ring_name, 4096)
    else:
        ring = shmring.Ring.create(ring_name, 1 << 16)
        h = getattr(ring, handle)()
    try:
        for name in ("store_u64", "cas_u64", "load_u64", "store_u32", "load_u32", "fetch_add_u64"):
            with pytest.raises(AttributeError, match="not public"):
                getattr(h, name)
        if handle == "producer":
            h.send(b"still works")               # internal callers unaffected
        if handle == "state":
            h.publish({"x": 1})
            assert h.stats()["version"] == 1
    finally:
        h.close()
        if handle != "state":
            ring.close()


def test_msg_nbytes_is_the_encoded_size_and_value_nbytes_the_payload(ring_name):
    with shmring.Ring.create(ring_name, 1 << 16) as ring, ring.producer() as prod, ring.consumer() as cons:
        prod.send(np.zeros(12, np.float64))
        prod.send(b"abc")
        with cons.recv(timeout=5) as m:
            assert m.value.nbytes == 96 and m.nbytes > 96        # an array message: data + descriptor
        with cons.recv(timeout=5) as m:
            assert m.nbytes == 3                                  # bytes: their length


EXIT_WITH_BATCH = """
import numpy as np, shmring
ring = shmring.Ring.anonymous(1 << 16, dtype=np.dtype([("t", "<f8")]))
p, c = ring.producer(), ring.consumer()
p.send_many(np.zeros(10, ring.dtype))
batch = c.recv_many(10, timeout=1)          # never released: still alive at interpreter exit
keep = batch.arrays
print("ok")
"""


def test_an_unreleased_record_batch_at_exit_prints_no_traceback():
    r = subprocess.run([sys.executable, "-c", EXIT_WITH_BATCH], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n"
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_docs_do_not_send_users_to_a_brief_they_do_not_have():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for f in [root / "README.md", root / "docs" / "design.md", *(root / "src" / "shmring").glob("*.py")]:
        assert "the brief" not in f.read_text().lower() and "architecture brief" not in f.read_text().lower(), f
