"""More peers, measured in the same run and the same tables as the others (issue 15 item 4):

* zenoh-python (``eclipse-zenoh``): publisher/subscriber over a Unix socket between two peer
  sessions; for arrays also its shared-memory mode (``zenoh.shm.ShmProvider``);
* Ray's object store: ``ray.put`` of a numpy array in one process, ``ray.get`` (a zero-copy,
  read-only view of the object store) in the other;
* ``torch.multiprocessing.Queue`` of CPU tensors (storage moved to shared memory, passed by
  file descriptor);
* Arrow IPC over a memory map (``pyarrow``): record batches written into a /dev/shm file
  mapped by both sides, read back zero-copy.

Every case follows the rules of ``cases.py``: the same payloads (prebuilt 64 B / 4 KiB
messages with their index in the first 8 bytes; float32 arrays of ``np.ones`` carrying the
sequence number in their first and last element), the same consumer work (touch two
elements, or sum the whole array and check the sum), the same checks.  A peer that is not
installed is listed as ``not run: ...``; one that cannot start here (for example a Ray
cluster that does not come up) is listed the same way with the reason.

What each peer's Python API makes a user do is what is measured; the notes say how many
copies that is.  Nothing here is tuned beyond what the peer's documentation shows.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from .cases import MASK, U64, CaseFailed, LargeStream, PingPong, SmallStream, uniq
from .harness import CTX
from . import interop_cases


def _find(mod: str) -> str | None:
    """'not run: ...' if ``mod`` is not installed, without importing it."""
    try:
        if importlib.util.find_spec(mod) is None:
            return f"not run: {mod} is not installed"
    except Exception as e:      # noqa: BLE001
        return f"not run: cannot find {mod} ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- zenoh

class _Zenoh:
    """Two zenoh peer sessions joined by a Unix socket (the consumer listens, the producer
    connects); multicast and gossip scouting are off, so nothing leaves the machine.
    Publishers use ``CongestionControl.BLOCK`` (the default, DROP, may drop under load);
    subscribers receive from a FIFO channel with a blocking ``recv()``."""
    requires = ("zenoh",)
    fifo = 4096                 # the subscriber's FIFO channel (messages)

    def setup(self):
        path = f"/tmp/{uniq('bench_zenoh')}.sock"
        return {"path": path, "key": f"bench/{uniq('z')}"}

    def cleanup(self, res):
        try:
            os.unlink(res["path"])
        except FileNotFoundError:
            pass

    @staticmethod
    def _session(res, listen):
        import zenoh
        zenoh.init_log_from_env_or("error")
        c = zenoh.Config()
        c.insert_json5("mode", '"peer"')
        c.insert_json5("scouting/multicast/enabled", "false")
        c.insert_json5("scouting/gossip/enabled", "false")
        ep = json.dumps([f"unixsock-stream/{res['path']}"])
        if listen:
            c.insert_json5("listen/endpoints", ep)
        else:
            c.insert_json5("connect/endpoints", ep)
            c.insert_json5("connect/timeout_ms", "20000")
            c.insert_json5("connect/exit_on_failure", "true")
        return zenoh.open(c)

    def _publisher(self, session, key):
        import zenoh
        pub = session.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK)
        deadline = time.monotonic() + 20
        while not pub.matching_status:            # wait until the subscriber is known
            if time.monotonic() > deadline:
                raise CaseFailed("zenoh: no matching subscriber within 20 s")
            time.sleep(0.005)
        return pub

    def _subscriber(self, session, key):
        import zenoh
        return session.declare_subscriber(key, zenoh.handlers.FifoChannel(self.fifo))

    def open(self, role, res):
        ep = {}
        if role == "b":
            ep["s"] = self._session(res, listen=True)
            ep["sub"] = self._subscriber(ep["s"], res["key"])
        else:
            time.sleep(0.2)                        # let the consumer bind its socket first
            ep["s"] = self._session(res, listen=False)
            ep["pub"] = self._publisher(ep["s"], res["key"])
        return ep

    def abandon(self, role, ep):
        for k in ("pub", "sub"):
            obj = ep.pop(k, None)
            if obj is not None:
                obj.undeclare()
        s = ep.pop("s", None)
        if s is not None:
            s.close()


class ZenohSmall(_Zenoh, SmallStream):
    transport = "zenoh pub/sub put(bytes) (unix socket)"
    note = "CongestionControl.BLOCK; subscriber FifoChannel(4096), blocking recv(), payload.to_bytes()"

    def produce(self, ep, n):
        put, pool = ep["pub"].put, self.pool
        for i in range(n):
            put(pool[i & MASK])

    def consume(self, ep, n):
        recv, u = ep["sub"].recv, U64
        s = 0
        for _ in range(n):
            s += u(recv().payload.to_bytes())[0]
        return s


class ZenohLarge(_Zenoh, LargeStream):
    transport = "zenoh pub/sub put(arr.tobytes()) (unix socket)"
    fifo = 2

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("arr.tobytes() (copy 1), put copies into zenoh's buffer (2), fragments through the "
                     "socket (kernel), subscriber payload.to_bytes() (copy) + np.frombuffer; FifoChannel(2)")

    def produce(self, ep, n):
        put = ep["pub"].put
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            put(src.tobytes())

    def consume(self, ep, n):
        recv = ep["sub"].recv
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            a = np.frombuffer(recv().payload.to_bytes(), np.float32)
            if bad_array(a, i):
                bad += 1
        return bad


class ZenohShmLarge(ZenohLarge):
    """zenoh's shared-memory mode: the producer allocates from a ``ShmProvider`` (POSIX
    shared memory) and publishes the buffer; the subscriber receives a reference to it
    (checked: ``payload.as_shm()`` is not None for every message, else the case fails).
    zenoh-python's SHM buffers have no buffer protocol: ``ZShmMut`` accepts only
    ``bytes``/``bytearray`` slices and ``ZShm``/``ZBytes`` only convert to ``bytes``, so a
    numpy array goes in through ``arr.tobytes()`` and comes out through ``to_bytes()``."""
    transport = "zenoh SHM provider: alloc + buf[:] = arr.tobytes()"
    SLOTS = 4

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("SHM buffer from ShmProvider.default_backend(4x the message), BlockOn(GarbageCollect()); "
                     "arr.tobytes() (copy 1) + buf[:] = (copy 2), subscriber payload.to_bytes() (copy 3: the "
                     "Python API has no zero-copy view); every payload checked to arrive as SHM")

    def unavailable(self):
        r = super().unavailable()
        if r:
            return r
        try:
            import zenoh.shm  # noqa: F401
        except Exception as e:      # noqa: BLE001
            return f"not run: zenoh has no shared-memory support here ({type(e).__name__}: {e})"
        return None

    def open(self, role, res):
        ep = super().open(role, res)
        if role == "a":
            import zenoh
            ep["prov"] = zenoh.shm.ShmProvider.default_backend(self.SLOTS * self.nbytes + (1 << 20))
            ep["policy"] = zenoh.shm.BlockOn(zenoh.shm.GarbageCollect())
        return ep

    def produce(self, ep, n):
        put, alloc, policy, nb = ep["pub"].put, ep["prov"].alloc, ep["policy"], self.nbytes
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            buf = alloc(nb, policy=policy)
            buf[:] = src.tobytes()
            put(buf)
            del buf

    def consume(self, ep, n):
        recv = ep["sub"].recv
        bad = 0
        not_shm = 0
        bad_array = self.bad_array
        for i in range(n):
            p = recv().payload
            if p.as_shm() is None:
                not_shm += 1
            a = np.frombuffer(p.to_bytes(), np.float32)
            del p
            if bad_array(a, i):
                bad += 1
        if not_shm:
            raise CaseFailed(f"zenoh: {not_shm} of {n} payloads did not arrive as shared memory")
        return bad

    def abandon(self, role, ep):
        super().abandon(role, ep)
        ep.pop("prov", None)


class ZenohPingPong(_Zenoh, PingPong):
    transport = "zenoh pub/sub pair (unix socket)"
    note = "two keys, a publisher and a FifoChannel subscriber on each side, blocking recv()"

    def open(self, role, res):
        listen = role == "b"
        if not listen:
            time.sleep(0.2)
        s = self._session(res, listen=listen)
        mine, theirs = (res["key"] + "/ping", res["key"] + "/pong")
        if role == "b":
            mine, theirs = theirs, mine
        sub = self._subscriber(s, theirs)
        pub = self._publisher(s, mine)
        recv = sub.recv
        return {"s": s, "sub": sub, "pub": pub, "send": pub.put, "recv": lambda: recv().payload.to_bytes()}


# ----------------------------------------------------------------------------- Ray

_RAY = {"proc": None, "addr": None, "dir": None, "error": None}
_RAY_HEAD = r"""
import sys
import ray
ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
               object_store_memory=int(sys.argv[1]), _temp_dir=sys.argv[2])
print("ADDR", ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()          # until the bench closes our stdin
ray.shutdown()
"""
RAY_START_TIMEOUT = 120.0
RAY_STORE = 1 << 30


def _ray_env():
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"    # a private, short-lived local cluster; no token file written
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def ray_cluster() -> str:
    """Start (once per bench run) a local Ray cluster in a helper process of its own
    session, and return its GCS address.  The bench's own processes never call
    ``ray.init()`` as a head: the parent forks every case's children, and a forked Ray
    driver is not supported.  Raises RuntimeError with the reason if it does not start."""
    if _RAY["addr"]:
        return _RAY["addr"]
    if _RAY["error"]:
        raise RuntimeError(_RAY["error"])
    tmp = f"/tmp/bray{os.getpid()}"
    _RAY["dir"] = tmp
    log = open(tmp + "-head.log", "w+")      # not a pipe: an unread pipe could fill and block the head
    proc = subprocess.Popen([sys.executable, "-c", _RAY_HEAD, str(RAY_STORE), tmp], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, env=_ray_env(),
                            start_new_session=True)
    log.close()
    _RAY["proc"] = proc
    atexit.register(ray_shutdown)
    from multiprocessing.connection import wait
    deadline = time.monotonic() + RAY_START_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not wait([proc.stdout], timeout=left):
            _RAY["error"] = f"the Ray head did not start within {RAY_START_TIMEOUT:.0f} s"
            break
        line = proc.stdout.readline()
        if not line:
            with open(tmp + "-head.log") as f:
                err = [x for x in f.read().strip().splitlines() if x.strip()]
            _RAY["error"] = "the Ray head exited: " + (err[-1] if err else f"exit code {proc.wait()}")
            break
        if line.startswith("ADDR "):
            _RAY["addr"] = line.split()[1]
            return _RAY["addr"]
    ray_shutdown()
    raise RuntimeError(_RAY["error"])


def ray_shutdown():
    """Stop the cluster this run started (EOF on the helper's stdin: it calls ray.shutdown(),
    which stops the processes it started; what is left of its session is SIGKILLed by
    process group) and remove its temp dir."""
    proc = _RAY["proc"]
    if proc is None:
        return
    _RAY["proc"] = None
    _RAY["addr"] = None
    try:
        proc.stdin.close()
        proc.wait(30)
    except Exception:       # noqa: BLE001
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(5)
    except Exception:       # noqa: BLE001
        pass
    if _RAY["dir"]:
        shutil.rmtree(_RAY["dir"], ignore_errors=True)
        try:
            os.unlink(_RAY["dir"] + "-head.log")
        except FileNotFoundError:
            pass


class RayLarge(LargeStream):
    """``ray.put(arr)`` in the producer (one copy into the object store, pickle protocol 5
    with the array out of band), the ObjectRef to the consumer over a Pipe, ``ray.get(ref)``
    there: a read-only numpy view of the object store, no copy.  Both processes are Ray
    drivers connected to one local cluster (started once per run, ``num_cpus=2``, no
    dashboard, 1 GiB object store).  At most 4 objects are in flight: the consumer acks
    each one when it has dropped its view, and the producer then drops its reference.
    The ref is passed out of band (``ray.cloudpickle``), which makes Ray pin the object in
    the producer for good; the producer undoes that pin on the ack
    (``core_worker.remove_object_ref_reference``), else the store would fill up and spill."""
    transport = "Ray object store put/get (zero-copy get)"
    WINDOW = 4

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("ray.put: one copy into the object store; ref over a Pipe; ray.get: read-only zero-copy "
                     "view; 4 in flight; cluster processes (raylet, GCS) not pinned")

    def unavailable(self):
        r = _find("ray")
        if r:
            return r
        try:
            ray_cluster()
        except Exception as e:      # noqa: BLE001
            return f"not run: Ray cluster did not start: {e}"
        return None

    def setup(self):
        a, b = CTX.Pipe()
        return {"addr": ray_cluster(), "a": a, "b": b}

    def cleanup(self, res):
        res["a"].close()
        res["b"].close()

    def open(self, role, res):
        os.environ.update({k: v for k, v in _ray_env().items() if k.startswith("RAY_")})
        import ray
        ray.init(address=res["addr"], log_to_driver=False, logging_level="ERROR")
        ep = {"ray": ray, "c": res[role], "inflight": []}
        if role == "a":
            ep["cw"] = ray._private.worker.global_worker.core_worker
            self.src(ep)
        return ep

    def _release(self, ep):
        ep["c"].recv_bytes()
        ref = ep["inflight"].pop(0)
        ep["cw"].remove_object_ref_reference(ref)
        del ref

    def produce(self, ep, n):
        ray, send, inflight = ep["ray"], ep["c"].send_bytes, ep["inflight"]
        dumps, put, src, w = ray.cloudpickle.dumps, ray.put, self.src(ep), self.WINDOW
        for i in range(n):
            if len(inflight) >= w:
                self._release(ep)
            src[0] = i
            src[-1] = i
            ref = put(src)
            inflight.append(ref)
            send(dumps(ref))
            del ref
        while inflight:
            self._release(ep)

    def consume(self, ep, n):
        ray, conn = ep["ray"], ep["c"]
        loads, get = ray.cloudpickle.loads, ray.get
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            ref = loads(conn.recv_bytes())
            a = get(ref)
            if bad_array(a, i):
                bad += 1
            del a, ref
            conn.send_bytes(b"k")
        return bad

    def finish(self, role, ep):
        ep["ray"].shutdown()
        return None


# ----------------------------------------------------------------------------- torch.multiprocessing

class _Torch:
    """torch.multiprocessing.Queue (fork context).  Putting a CPU tensor moves its storage
    into shared memory (``share_memory_()``, a copy, once per storage) and sends a file
    descriptor (the default ``file_descriptor`` sharing strategy: ``multiprocessing``'s
    resource sharer, i.e. for every tensor the consumer opens a new authenticated
    connection to a thread in the producer and receives the fd over it, then maps it; a
    storage it has mapped before comes from torch's cache).  torch is imported in the parent when the case is checked
    (as a DataLoader's parent does before it forks); each side uses one intra-op thread."""
    requires = ("torch",)
    MAXSIZE = 4

    def setup(self):
        import torch.multiprocessing as tmp
        return {"q": tmp.get_context("fork").Queue(maxsize=self.MAXSIZE)}

    def cleanup(self, res):
        res["q"].close()

    def open(self, role, res):
        import torch
        torch.set_num_threads(1)
        return {"q": res["q"], "torch": torch}

    def abandon(self, role, ep):
        ep["q"].cancel_join_thread()


class TorchQueueLarge(_Torch, LargeStream):
    transport = "torch.mp Queue put(tensor), new tensor each"

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("torch.from_numpy(arr).clone() (copy 1), put moves it into a new shared-memory segment "
                     "(copy 2); consumer gets the fd over a new resource-sharer connection and maps it, t.numpy() "
                     "(no copy); maxsize=4")

    def produce(self, ep, n):
        put, from_numpy = ep["q"].put, ep["torch"].from_numpy
        src = self.src(ep)
        for i in range(n):
            src[0] = i
            src[-1] = i
            put(from_numpy(src).clone())

    def consume(self, ep, n):
        get = ep["q"].get
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            t = get()
            if bad_array(t.numpy(), i):
                bad += 1
            del t
        return bad


class TorchQueuePoolLarge(_Torch, LargeStream):
    transport = "torch.mp Queue, pool of 4 shared tensors"
    SLOTS = 4

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.note = ("4 tensors share_memory_()'d once; t.copy_(arr) into a free one (one copy), put((slot, t)): "
                     "still an fd per message over a new resource-sharer connection, mapping cached; slot index "
                     "back over a Pipe when the consumer is done")

    def setup(self):
        res = super().setup()
        res["a"], res["b"] = CTX.Pipe()
        return res

    def cleanup(self, res):
        super().cleanup(res)
        res["a"].close()
        res["b"].close()

    def open(self, role, res):
        ep = super().open(role, res)
        ep["c"] = res[role]
        if role == "a":
            torch = ep["torch"]
            ep["pool"] = [torch.ones(self.count, dtype=torch.float32).share_memory_() for _ in range(self.SLOTS)]
            ep["free"] = list(range(self.SLOTS))
            ep["srct"] = torch.from_numpy(self.src(ep))
        return ep

    def produce(self, ep, n):
        put, conn, pool, free, src, srct = ep["q"].put, ep["c"], ep["pool"], ep["free"], ep["src"], ep["srct"]
        for i in range(n):
            k = free.pop() if free else conn.recv()
            src[0] = i
            src[-1] = i
            pool[k].copy_(srct)
            put((k, pool[k]))
        for _ in range(self.SLOTS - len(free)):      # all slots back: the next round starts clean
            free.append(conn.recv())

    def consume(self, ep, n):
        get, conn = ep["q"].get, ep["c"]
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            k, t = get()
            if bad_array(t.numpy(), i):
                bad += 1
            del t
            conn.send(k)
        return bad


# ----------------------------------------------------------------------------- Arrow IPC over a memory map

class ArrowMmapLarge(LargeStream):
    """Arrow IPC streams in a /dev/shm file that both sides map with ``pa.memory_map``
    (the writer ``r+``, the reader ``r``).  The file holds 4 slots of one message each
    (schema + one record batch with a single float32 column, ``pa.array(arr)`` wrapping the
    array without a copy); the writer seeks to a free slot and writes the stream
    (``pa.ipc.new_stream`` + ``write_batch``: one copy, into the map), the slot index goes
    over a Pipe, the reader opens the stream at that offset (``pa.ipc.open_stream``,
    ``read_next_batch``) and takes ``column(0).to_numpy(zero_copy_only=True)``: a view of
    the map, checked on every message to lie inside it; the slot index goes back when the
    reader is done.  Appending to one growing file instead would need the file to grow
    by GBs per round (16 MiB x thousands of messages) and the reader to remap it."""
    transport = "Arrow IPC stream in a /dev/shm memory map"
    requires = ("pyarrow",)
    SLOTS = 4

    def __init__(self, nbytes, summing=False):
        super().__init__(nbytes, summing)
        self.slot = nbytes + (64 << 10)
        self.note = ("record batch written into one of 4 slots of a mapped /dev/shm file (one copy), slot "
                     "index over a Pipe and back; reader: open_stream + to_numpy(zero_copy_only=True), "
                     "checked to be a view of the map")

    def unavailable(self):
        return _find("pyarrow")          # imported in the children only

    def setup(self):
        path = f"/dev/shm/{uniq('bench_arrow')}"
        with open(path, "wb") as f:
            f.truncate(self.SLOTS * self.slot)
        a, b = CTX.Pipe()
        return {"path": path, "a": a, "b": b}

    def cleanup(self, res):
        res["a"].close()
        res["b"].close()
        try:
            os.unlink(res["path"])
        except FileNotFoundError:
            pass

    def open(self, role, res):
        import pyarrow as pa
        mm = pa.memory_map(res["path"], "r+" if role == "a" else "r")
        ep = {"pa": pa, "mm": mm, "c": res[role]}
        if role == "a":
            ep["schema"] = pa.schema([("x", pa.float32())])
            ep["free"] = list(range(self.SLOTS))
            self.src(ep)
        else:
            mm.seek(0)
            whole = mm.read_buffer(self.SLOTS * self.slot)     # zero-copy: a view of the map
            ep["lo"], ep["hi"] = whole.address, whole.address + whole.size
            del whole
        return ep

    def produce(self, ep, n):
        pa, mm, conn, schema, free, src = ep["pa"], ep["mm"], ep["c"], ep["schema"], ep["free"], ep["src"]
        new_stream, array, record_batch, slot = pa.ipc.new_stream, pa.array, pa.record_batch, self.slot
        for i in range(n):
            k = free.pop() if free else conn.recv()
            src[0] = i
            src[-1] = i
            mm.seek(k * slot)
            with new_stream(mm, schema) as w:
                w.write_batch(record_batch([array(src)], schema=schema))
            if mm.tell() > (k + 1) * slot:
                raise CaseFailed("arrow: a message overran its slot")
            conn.send(k)
        for _ in range(self.SLOTS - len(free)):
            free.append(conn.recv())

    def consume(self, ep, n):
        pa, mm, conn, lo, hi = ep["pa"], ep["mm"], ep["c"], ep["lo"], ep["hi"]
        open_stream, slot = pa.ipc.open_stream, self.slot
        bad = 0
        bad_array = self.bad_array
        for i in range(n):
            k = conn.recv()
            mm.seek(k * slot)
            batch = open_stream(mm).read_next_batch()
            a = batch.column(0).to_numpy(zero_copy_only=True)
            addr = a.__array_interface__["data"][0]
            if not lo <= addr < hi:
                raise CaseFailed("arrow: the batch was not read zero-copy from the map")
            if bad_array(a, i):
                bad += 1
            del a, batch
            conn.send(k)
        return bad

    def abandon(self, role, ep):
        ep["mm"].close()


# ----------------------------------------------------------------------------- registry

def small_cases(size):
    return [ZenohSmall(size)]


def large_cases(nbytes, summing):
    return [ZenohLarge(nbytes, summing), ZenohShmLarge(nbytes, summing), RayLarge(nbytes, summing),
            TorchQueueLarge(nbytes, summing), TorchQueuePoolLarge(nbytes, summing),
            ArrowMmapLarge(nbytes, summing)] + interop_cases.large_cases(nbytes, summing)


def pingpong_cases(gap=0.0):
    return [ZenohPingPong(gap)]


def shutdown():
    """Stop what these peers started for the whole run (the Ray cluster)."""
    ray_shutdown()
