"""Isolation: what another user, a hostile name or a planted file can do.

Already covered elsewhere, and not repeated here: 0600 by default and an
explicit ``mode=`` (tests/test_segment.py::test_segments_are_created_mode_0600_by_default,
::test_an_explicit_mode_is_respected_whatever_the_umask, ::test_file_ring_mode_is_respected),
another uid cannot attach to a 0600 ring but can to a 0666 one (::test_attaching_without_permission_is_permission_denied,
run as uid 65534 when this process can setuid), symlinks are refused
(::test_attaching_through_a_symlink_is_refused, ::test_creating_at_a_symlink_does_not_follow_it).
"""
import os
import pathlib
import re

import pytest

import shmring

SRC = pathlib.Path(shmring.__file__).parent


@pytest.mark.parametrize("bad", ["..", ".", "../x", "x/../../etc/passwd", "a\x00b", "a b", "ring\n",
                                 "é", "~root", "*", "shmring.x/..", "\\x"])
def test_names_cannot_escape_the_shmring_namespace(bad):
    for call in (lambda: shmring.Ring.create(bad, 4096), lambda: shmring.Ring.attach(bad),
                 lambda: shmring.unlink(bad)):
        with pytest.raises(ValueError):
            call()


def test_every_valid_name_maps_inside_dev_shm_under_the_prefix():
    from shmring.segment import posix_name, validate_name
    for name in ["a", "A-1_b.c", "x" * 64, "9..9"]:
        p = posix_name(validate_name(name))
        assert p.startswith("/shmring.") and p.count("/") == 1


@pytest.fixture
def foreign_file_ring(tmp_path):
    path = tmp_path / "theirs.ring"
    with shmring.Ring.create(path=path, capacity=1 << 12) as r, r.producer() as p:
        p.send(b"planted")
    try:
        os.chown(path, 65534, 65534)
    except PermissionError:
        pytest.skip("cannot chown a file to another uid here (not root)")
    return path


def test_a_ring_file_owned_by_another_user_is_refused_unless_asked(foreign_file_ring):
    with pytest.raises(shmring.PermissionDenied, match=r"owned by uid 65534.*allow_foreign_owner=True"):
        shmring.Ring.attach(path=foreign_file_ring)
    with shmring.Ring.attach(path=foreign_file_ring, allow_foreign_owner=True) as r, r.consumer() as c:
        assert c.recv_bytes(timeout=5) == b"planted"


def test_a_symlink_to_a_foreign_file_is_refused_even_with_allow_foreign_owner(foreign_file_ring, tmp_path):
    link = tmp_path / "link.ring"
    link.symlink_to(foreign_file_ring)
    with pytest.raises(shmring.PermissionDenied, match="symbolic link"):
        shmring.Ring.attach(path=link, allow_foreign_owner=True)


def test_no_module_of_shmring_uses_pickle_to_decode_shared_memory():
    """Shared memory is untrusted input: decoding it must never run code.  Rings
    pickle *themselves* by name (__reduce__), which reads nothing from the segment."""
    pat = re.compile(r"\b(import\s+(c?pickle|dill|marshal|shelve)|from\s+(c?pickle|dill|marshal)\s+import"
                     r"|pickle\.loads?|PyPickle|_pickle|marshal\.loads?|\beval\(|\bexec\()")
    files = list(SRC.glob("*.py")) + list(SRC.glob("*.c")) + list(SRC.glob("*.h"))
    assert len(files) >= 8
    hits = [f"{f.name}: {m.group(0)}" for f in files for m in pat.finditer(f.read_text())]
    # The one exception (issue 17, README "Trust: pickle"): shmring.Queue unpickles its
    # items, with multiprocessing's trust model; no other module may, nor import it.
    assert [h for h in hits if not h.startswith("queues.py: ")] == []
    importers = [f.name for f in files if f.name not in ("queues.py", "__init__.py")
                 and re.search(r"\bqueues\b", f.read_text())]
    assert importers == []


def test_arbitrary_python_objects_are_refused_not_pickled(ring_name):
    import numpy as np
    with shmring.Ring.create(ring_name, 1 << 12) as r, r.producer() as p:
        for v in (object(), {1, 2}, np.array([object()]), lambda: 0):
            with pytest.raises(shmring.UnsupportedType):
                p.send(v)
        assert r.stats()["write_pos"] == 0
