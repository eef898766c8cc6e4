"""A child process for tests/test_liveness.py: attach to a segment, take one
role, print "ready", then hold it until killed (or, with "main-exits", let the
main thread exit while a worker thread holds the role).

    python _liveness_child.py NAME WHAT [main-exits | forks]

WHAT: attach (no role), spsc-consumer, spsc-producer, mpmc-consumer,
subscriber, state-reader (blocked in wait_newer), state-writer, view (holds
only a Message view: the ring and consumer closed).
"""
import ctypes
import os
import sys
import threading
import time

import shmring


def hold(name, what):
    if what.startswith("state"):
        st = shmring.SharedState.attach(name)
        if what == "state-writer":
            st.publish(b"from the child")
            print("ready", flush=True)
            time.sleep(600)
        print("ready", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:     # a reader waiting on: the writer that finished may be followed
            try:
                st.wait_newer(10 ** 9, timeout=deadline - time.monotonic())
            except shmring.EndOfStream:        # the writer closed (R57): wait for a next one
                time.sleep(0.05)
        return
    ring = shmring.Ring.attach(name)
    if what == "attach":
        keep = ring
    elif what == "spsc-consumer" or what == "mpmc-consumer":
        keep = ring.consumer()
    elif what == "subscriber":
        keep = ring.subscribe()
    elif what == "spsc-producer":
        keep = ring.producer()
        keep.send(b"from the child")
    elif what == "view":
        c = ring.consumer()
        msg = c.recv(timeout=60)
        keep = msg.value                       # a view of the ring's memory, nothing else
        try:
            msg.release()
        except Exception:
            pass
        c.close()
        ring.close()
        del c, ring, msg
    else:
        raise SystemExit(f"unknown role {what}")
    print("ready", flush=True)
    time.sleep(600)
    del keep


def main():
    name, what = sys.argv[1], sys.argv[2]
    if sys.argv[3:] == ["forks"]:
        # take the role, then fork a child that outlives us (it prints its pid
        # first): its inherited descriptors must not keep our role "alive"
        ring = shmring.Ring.attach(name)
        keep = ring.consumer()
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        print(pid, flush=True)
        print("ready", flush=True)
        time.sleep(600)
        del keep
    if sys.argv[3:] == ["main-exits"]:
        t = threading.Thread(target=hold, args=(name, what))
        t.start()
        time.sleep(0.5)
        ctypes.CDLL(None).pthread_exit(None)   # the main thread ends; the worker keeps the role
    hold(name, what)


if __name__ == "__main__":
    main()
