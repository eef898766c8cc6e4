"""Squatting: another uid pre-creates a world-writable segment under the name a
root process is about to use.  Attach by name checks the owner as attach by
path does (``allow_foreign_owner=True`` opts in); create says who owns the name.

The squatter runs as uid 65534 in a forked child; root only.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import shmring

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a squatter as uid 65534")

NOBODY = 65534


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a forked child that dropped to uid 65534.

    A fork, not ``setpriv python``: the child needs no read access to the
    checkout, the venv or the interpreter (a clean clone in a 0700 directory
    is where CI runs), and it is still another process of another uid."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # child: never returns into pytest
        rc = 1
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            exec(compile(code, "<as_nobody>", "exec"), {"__name__": "__as_nobody__"})
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    os.close(out_w)
    os.close(err_w)
    with open(out_r) as o, open(err_r) as e:
        stdout, stderr = o.read(), e.read()
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc and "Operation not permitted" in stderr and "setuid" in stderr:
        pytest.skip(f"cannot drop to uid {NOBODY}: {stderr.strip()}")
    return subprocess.CompletedProcess(["as_nobody"], rc, stdout, stderr)


def squat(name, what="ring"):
    """uid 65534 creates a 0666 segment under ``name`` and leaves it there."""
    make = {"ring": f"shmring.Ring.create({name!r}, 4096, mode=0o666)",
            "mpsc": f"shmring.Ring.create({name!r}, 4096, kind='mpsc', mode=0o666)",
            "records": f"shmring.Ring.create({name!r}, 4096, dtype='<f8', mode=0o666)",
            "state": f"shmring.SharedState.create({name!r}, 4096, mode=0o666)"}[what]
    code = (f"import os, shmring\nh = {make}\n"
            + ("h.publish({'admin': False, 'planted': True})\n" if what == "state" else "")
            + "os._exit(0)\n")                      # leave without unlinking: the name stays squatted
    r = as_nobody(code)
    assert r.returncode == 0, r.stderr
    assert os.stat(f"/dev/shm/shmring.{name}").st_uid == NOBODY


@pytest.mark.parametrize("what", ["ring", "mpsc", "records"])
def test_attaching_a_ring_name_squatted_by_another_user_is_refused_unless_asked(ring_name, what):
    squat(ring_name, what)
    with pytest.raises(shmring.PermissionDenied) as ei:
        shmring.Ring.attach(ring_name)
    msg = str(ei.value)
    assert ring_name in msg and f"owned by uid {NOBODY}" in msg and "allow_foreign_owner=True" in msg
    with shmring.Ring.attach(ring_name, allow_foreign_owner=True) as ring:      # the opt-in still works
        assert ring.capacity == 4096


def test_a_secret_sent_by_root_never_reaches_a_squatted_segment(ring_name):
    squat(ring_name)
    try:
        with shmring.Ring.attach(ring_name) as ring, ring.producer() as p:
            p.send(b"root's secret")
    except shmring.PermissionDenied:
        pass
    r = as_nobody(f"import shmring\nr = shmring.Ring.attach({ring_name!r})\nc = r.consumer()\n"
                  "print(c.try_recv() is None)\n")
    assert r.returncode == 0 and r.stdout.strip() == "True", (r.stdout, r.stderr)


def test_attaching_a_shared_state_squatted_by_another_user_is_refused_unless_asked(ring_name):
    squat(ring_name, "state")
    with pytest.raises(shmring.PermissionDenied, match=f"owned by uid {NOBODY}.*allow_foreign_owner=True"):
        shmring.SharedState.attach(ring_name)
    with shmring.SharedState.attach(ring_name, allow_foreign_owner=True) as st, st.read() as snap:
        assert snap.value == {"admin": False, "planted": True}


def test_creating_a_name_squatted_by_another_user_says_who_owns_it_and_what_to_do(ring_name):
    squat(ring_name)
    for create in (lambda: shmring.Ring.create(ring_name, 4096),
                   lambda: shmring.SharedState.create(ring_name, 4096)):
        with pytest.raises(shmring.SegmentExists) as ei:
            create()
        msg = str(ei.value)
        assert ring_name in msg and f"owned by uid {NOBODY}" in msg and "another user" in msg
        assert f"shmring rm {ring_name}" in msg                    # what to do
    assert os.stat(f"/dev/shm/shmring.{ring_name}").st_uid == NOBODY   # and nothing was touched


def test_a_ring_attached_with_allow_foreign_owner_pickles_with_it(ring_name):
    squat(ring_name)
    with shmring.Ring.attach(ring_name, allow_foreign_owner=True) as ring:
        with pickle.loads(pickle.dumps(ring)) as again:              # a spawn child attaches like this
            assert again.capacity == 4096


def test_a_ring_of_another_user_shared_on_purpose_works_with_allow_foreign_owner(ring_name):
    # The control case: a 0666 ring another user made for us works end to end once we opt in.
    squat(ring_name)
    with shmring.Ring.attach(ring_name, allow_foreign_owner=True) as ring, ring.producer() as p:
        p.send(np.arange(4.0))
    r = as_nobody(f"import shmring\nr = shmring.Ring.attach({ring_name!r})\n"
                  "print(r.consumer().recv(timeout=5, copy=True).tolist())\n")
    assert r.returncode == 0 and r.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]", r.stderr


def test_ls_and_stat_show_a_segment_of_another_user_with_its_owner(ring_name):
    squat(ring_name)
    run = lambda *a: subprocess.run([sys.executable, "-m", "shmring", *a], capture_output=True,   # noqa: E731
                                    text=True, timeout=60)
    r = run("ls", "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["name"] == ring_name)
    assert row["kind"] == "spsc" and row["owner_uid"] == NOBODY
    r = run("stat", ring_name)
    assert r.returncode == 0 and f"owner uid {NOBODY}" in r.stdout, (r.stdout, r.stderr)
