"""One step on many processes: what the ranks of a ``torchrun`` / ``accelerate launch`` share.

The launchers are the users' own (torchrun, accelerate with DDP / FSDP / DeepSpeed); nothing
here starts workers except :func:`relaunch`, which hands a command to torchrun itself. This
module knows nothing of MLflow; ``tracking.step_run`` builds "one run per launch" on it:

* **Who does what.** The main process (global rank 0) owns the tracking run; every rank trains
  and evaluates. Work that must happen once (tracking-server checks, reference lookups,
  artifact downloads, the first touch of a fresh SQLite store) goes through :func:`on_main`:
  rank 0 runs it, the other ranks wait and receive its result, or the same error.
* **Failures.** :class:`StepGang` coordinates one step: rank 0 publishes the run it opened,
  every rank reports "done" or its error, and rank 0 publishes the final status. A rank that
  fails writes its error before it exits, so rank 0 records *that* error as the run's cause
  (not the "connection closed by peer" it sees next), and a watcher thread on rank 0 marks
  the run FAILED at once even when rank 0 itself is stuck in a collective and later killed.
* **Transport.** The key-value store of the process group (the launcher's rendezvous store,
  a TCPStore), not collectives: a rank that failed mid-training never joins another
  collective (mismatched collectives hang), and polling the store keeps SIGTERM handling alive
  in every waiting rank. Collectives are used only where every rank is at the same point:
  :func:`max_over_ranks`, :func:`sum_over_ranks`, :func:`broadcast_object`.

Single-process runs (``WORLD_SIZE`` unset or 1) never initialise anything: every function
here is then a plain pass-through.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from mlproject.errors import StepFailed, UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- who am I

def world_size() -> int:
    """Processes in this launch (``WORLD_SIZE``, set by torchrun and accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's global rank (0 when not launched by a distributed launcher)."""
    return int(os.environ.get("RANK") or 0) if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0) if active() else 0


def active() -> bool:
    """True under a launcher with more than one process."""
    return world_size() > 1


def is_main() -> bool:
    """The process that talks to the tracking server: global rank 0 (or the only process)."""
    return rank() == 0


def kind() -> str:
    """How the launch spreads the work: ``none`` (one process), ``ddp``, ``fsdp`` or ``deepspeed``."""
    if not active():
        return "none"
    for name, var in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            return name
    return "ddp"


def init():
    """The launch's process group, created once through accelerate's ``PartialState`` (what the
    trl/transformers trainers use too, so they find it ready: gloo on CPU, NCCL on GPUs with the
    device set to this rank's, DeepSpeed's own initialisation under a DeepSpeed config).
    None when single-process."""
    if not active():
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch
        from accelerate import PartialState

        # cpu=True where there is no GPU: without it accelerate sets up a "single process"
        # state on CPU (distributed_type NO) even under torchrun, and its collectives do nothing.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        PartialState(cpu=cpu)
        log.debug("rank %d of %d: process group ready (%s)", rank(), world_size(), dist.get_backend())
    return dist


def shutdown() -> None:
    """Destroy the process group at a clean exit (torch warns about leaked groups otherwise)."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --------------------------------------------------------------------------- the store

class _Store:
    """The process group's key-value store under a prefix of our own, with a lock: the
    watcher thread and the main thread share one client connection."""

    def __init__(self, store: Any):
        self.store = store
        self.lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.store.set(key, value)

    def get(self, key: str) -> bytes | None:
        """The value, or None while the key is absent (never blocks)."""
        with self.lock:
            if not self.store.check([key]):
                return None
            return self.store.get(key)

    def add(self, key: str, amount: int) -> int:
        with self.lock:
            return int(self.store.add(key, amount))

    def wait(self, key: str, poll: float = 0.05, max_poll: float = 0.5) -> bytes:
        """Block until ``key`` is set. Polls (instead of ``store.wait``, which blocks in C++)
        so SIGTERM from the launcher still reaches the Python handler of a waiting rank."""
        while True:
            value = self.get(key)
            if value is not None:
                return value
            time.sleep(poll)
            poll = min(poll * 1.5, max_poll)


_STORE: _Store | None = None


def _store() -> _Store:
    global _STORE
    if _STORE is None:
        init()
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        # The launcher's rendezvous store (torchrun's agent store); a restart of the workers
        # (torchrun --max-restarts) keeps it, so each attempt gets its own prefix.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _STORE = _Store(dist.PrefixStore(f"mlproject/{attempt}/", distributed_c10d._get_default_store()))
    return _STORE


# Every rank numbers its coordination points in the same order (steps run the same code on
# every rank); a point's number names its keys in the store.
_SEQ = itertools.count()
_ON_MAIN = contextvars.ContextVar("mlproject_on_main", default=False)


def _next_key(kind: str) -> str:
    return f"{kind}/{next(_SEQ)}"


# --------------------------------------------------------------------------- errors

class RankFailed(StepFailed):
    """Another rank of this launch failed; ``str()`` is ``rank <r>: <its error>``."""

    def __init__(self, failed_rank: int, error: str):
        self.rank, self.error = failed_rank, error
        super().__init__(f"rank {failed_rank}: {error}")


def describe(exc: BaseException) -> dict[str, Any]:
    """A picklable account of an exception (classes of other ranks' errors may not unpickle)."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        text = f"{type(exc).__name__}: interrupted"
    else:
        text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return {"type": type(exc).__name__, "message": str(exc), "text": first, "user": isinstance(exc, UserError)}


def _rebuild(info: dict[str, Any], source: int = 0) -> Exception:
    """The error a waiting rank raises for what rank ``source`` reported: bad input stays a
    UserError (exit 2 on every rank), anything else names the rank it came from."""
    if info.get("user"):
        return UserError(info["message"])
    return RankFailed(source, info["text"])


# --------------------------------------------------------------------------- once, on main

def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on the main process only; every other rank waits for it and gets
    the same return value (pickled through the store) or the same error.

    Every rank must call it at the same point (it is used by code that runs identically on all
    ranks). Calls nested inside ``fn`` simply run on the main process.
    """
    if not active() or _ON_MAIN.get():
        return fn(*args, **kwargs)
    store = _store()
    key = _next_key("call")
    if is_main():
        token = _ON_MAIN.set(True)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            store.set(key, pickle.dumps(("error", describe(exc))))
            raise
        finally:
            _ON_MAIN.reset(token)
        store.set(key, pickle.dumps(("ok", value)))
        return value
    kind, value = pickle.loads(store.wait(key))
    if kind == "error":
        raise _rebuild(value)
    return value


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`on_main`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return on_main(fn, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- one step

class StepGang:
    """The coordination of one step across the ranks of a launch (see the module docstring).

    Keys under ``step/<n>/``: ``run`` (what rank 0 opened, or its error), ``failed/<rank>``,
    ``nfailed``, ``first`` (the rank that failed first), ``ndone``, ``final`` (rank 0's final
    status, published after the run is closed).
    """

    def __init__(self, store: Any = None, rank_: int | None = None, world: int | None = None):
        self.store = store if store is not None else _store()
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.ns = _next_key("step") + "/"
        self._failed_here = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _put(self, key: str, value: Any) -> None:
        self.store.set(self.ns + key, pickle.dumps(value))

    def _take(self, key: str) -> Any:
        raw = self.store.get(self.ns + key)
        return None if raw is None else pickle.loads(raw)

    def _wait(self, key: str) -> Any:
        return pickle.loads(self.store.wait(self.ns + key))

    # -- rank 0 opens the run
    def publish_run(self, info: Any) -> None:
        self._put("run", ("ok", info))

    def publish_run_error(self, exc: BaseException) -> None:
        if self._take("run") is None:
            self._put("run", ("error", describe(exc)))

    def wait_run(self) -> Any:
        kind, value = self._wait("run")
        if kind == "error":
            raise _rebuild(value)
        return value

    # -- every rank reports
    def fail(self, exc: BaseException) -> None:
        """Record this rank's error (first, before anything that could block or die)."""
        if self._failed_here:
            return
        self._failed_here = True
        self._put(f"failed/{self.rank}", describe(exc)["text"])
        if self.store.add(self.ns + "nfailed", 1) == 1:
            self._put("first", self.rank)

    def done(self) -> None:
        self.store.add(self.ns + "ndone", 1)

    def first_failure(self) -> tuple[int, str] | None:
        """(rank, error) of the rank that failed first, or None."""
        if self.store.add(self.ns + "nfailed", 0) == 0:
            return None
        first = self._wait("first")  # set right after the counter by the same rank
        return first, self._wait(f"failed/{first}")

    def wait_all(self, poll: float = 0.05) -> tuple[int, str] | None:
        """Wait until every rank reported done or failed; the first failure, or None."""
        while True:
            failed = self.store.add(self.ns + "nfailed", 0)
            done = self.store.add(self.ns + "ndone", 0)
            if failed:
                return self.first_failure()
            if done >= self.world:
                return None
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    # -- rank 0 closes
    def publish_final(self, status: str, failed_rank: int = 0, error: str = "") -> None:
        self._put("final", (status, failed_rank, error))

    def wait_final(self) -> tuple[str, int, str]:
        """(status, rank whose error decided it, that error) once rank 0 closed the run."""
        return self._wait("final")

    @contextlib.contextmanager
    def watch(self, on_failure: Callable[[int, str], None], interval: float = 0.5) -> Iterator[None]:
        """On rank 0: call ``on_failure(rank, error)`` (once, from a thread) as soon as another
        rank reports a failure, so the run is marked FAILED even if this process then hangs in a
        collective and is killed by the launcher."""
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(interval):
                try:
                    found = self.first_failure()
                except Exception:  # the store is gone: the launch is being torn down
                    return
                if found is not None and found[0] != self.rank:
                    with contextlib.suppress(Exception):
                        on_failure(*found)
                    return

        thread = threading.Thread(target=poll, name="mlproject-rank-watcher", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2 * interval + 1)


# --------------------------------------------------------------------------- collectives

def _tensor_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: Sequence[float], op: str) -> list[float]:
    if not active() or not values:
        return list(values)
    import torch

    dist = init()
    t = torch.tensor(list(values), dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in t.cpu().tolist()]


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum over the ranks, in float64 (NLL sums, token counts)."""
    return _all_reduce(values, "sum")


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Element-wise maximum over the ranks (peak memory of the launch)."""
    keys = sorted(values)
    return dict(zip(keys, _all_reduce([float(values[k]) for k in keys], "max"), strict=True))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (lm-eval's results, which it returns on rank 0 only)."""
    if not active():
        return obj
    dist = init()
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_tensor_device())
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (per-token KL values of the PPL shards)."""
    if not active():
        return [obj]
    dist = init()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        init().barrier()


# --------------------------------------------------------------------------- relaunch

def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m mlproject <argv>``:
    torchrun itself, on a free local rendezvous port (two launches on one host never clash).

    ``--nproc`` is left out of the ranks' arguments: they are the launch already, and torchrun's
    own parser rejects the token (an ambiguous prefix of its ``--nproc-per-node`` options)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mlproject", *args]


def relaunch(argv: Sequence[str], nproc: int) -> int:
    """Run this very command under torchrun with ``nproc`` processes and return its exit code.

    The ranks inherit the environment, ``MLFLOW_RUN_ID`` included: under ``mlflow run`` rank 0
    attaches to the run MLflow created and the other ranks never talk to MLflow. SIGTERM and
    Ctrl-C are passed on to torchrun, which stops its workers (their runs end KILLED)."""
    cmd = torchrun_command(argv, nproc)
    log.info("launching %d processes: %s", nproc, " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
