"""Process targets for test_state_end.py (module level, so they run under spawn too)."""
import time
import traceback

import shmring


def wait_without_timeout(name, than, q):
    """Block in wait_newer(than) with no timeout; report what ended it and how long it took
    after the parent said it was about to end the writer."""
    try:
        with shmring.SharedState.attach(name) as state:
            q.put(("waiting", None))
            try:
                v = state.wait_newer(than=than)
                q.put(("version", v))
            except shmring.EndOfStream as e:
                q.put(("EndOfStream", str(e)))
            except shmring.PeerGone as e:
                q.put(("PeerGone", str(e)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def write_then_close(name, versions, q):
    """Publish ``versions`` versions, report, and close the writer handle normally."""
    try:
        state = shmring.SharedState.attach(name)
        for i in range(versions):
            state.publish({"i": i})
        time.sleep(0.2)
        state.close()
        q.put(("closed", versions))
    except BaseException:
        q.put(("error", traceback.format_exc()))
