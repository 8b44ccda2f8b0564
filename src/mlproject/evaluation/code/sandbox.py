"""Run one generated program in its own confined subprocess, never in the evaluating process.

::

    from mlproject.evaluation.code.sandbox import Limits, run

    res = run("def add(a, b):\\n    return a + b\\n", "assert add(2, 3) == 5", limits=Limits())
    res.status            # "passed", "wrong_answer", "syntax_error", "timeout", "memory", …

What happens per program (details and the layers inside the child: ``_child.py``):

* a fresh temporary directory; the program runs with its ``work/`` subfolder as cwd, HOME and
  TMPDIR, and the whole directory is removed afterwards;
* ``python -I -B`` (no PYTHON* variables, no user site, no .pyc writes) in a new session, with
  an environment built from scratch: PATH, HOME, TMPDIR, a UTF-8 locale and one-thread math
  libraries; nothing of the evaluating process's environment (HF_TOKEN, MLFLOW_*, AWS_* …);
* stdout/stderr go to files capped by the file-size limit and are read back truncated;
* a wall-clock timeout kills the whole process group (SIGKILL), and the group is killed again
  after a normal exit so nothing it started lingers;
* the outcome travels over a private pipe as JSON; a program that dies without writing one is
  classified from its exit status (timeout, cpu_limit, killed by a signal, no_result).

A hung, crashing, memory-hungry or process-spawning program fails its problem with a status;
:func:`run` itself only raises for a broken installation (no Python to start).
"""

from __future__ import annotations

import json
import marshal
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("_child.py")

#: Every status a program can end with; only "passed" passes.
STATUSES = ("passed", "wrong_answer", "syntax_error", "error", "exit", "memory", "forbidden",
            "timeout", "cpu_limit", "killed", "no_result", "sandbox_error")


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``cpu_s`` defaults to the wall-clock budget rounded up."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_procs: int = 16
    file_size_mb: int = 16
    output_bytes: int = 2000
    cpu_s: float | None = None
    landlock: bool = True

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be at least 64 (Python itself needs ~30), "
                             f"got {self.memory_mb}")


@dataclass
class Timing:
    """Per-call seconds of the timing statement: every batch, and their medians."""

    cand: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    ref_status: str | None = None
    error: str = ""

    @property
    def cand_s(self) -> float | None:
        return _median(self.cand)

    @property
    def ref_s(self) -> float | None:
        return _median(self.ref)

    @property
    def ratio(self) -> float | None:
        c, r = self.cand_s, self.ref_s
        return c / r if c is not None and r else None


@dataclass
class ExecResult:
    status: str
    error: str = ""
    returncode: int | None = None
    wall_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    timing: Timing | None = None
    setup_s: float | None = None  # time the child spent confining itself
    run_s: float | None = None    # time the program and its tests ran
    landlock: int = 0             # Landlock ABI applied (0: not available)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.timing is not None:
            d["timing"].update(cand_s=self.timing.cand_s, ref_s=self.timing.ref_s,
                               ratio=self.timing.ratio)
        return d


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def clean_env(workdir: str) -> dict[str, str]:
    """The child's whole environment: built from scratch, never copied from ours."""
    one = "1"
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": one,
            "OPENBLAS_NUM_THREADS": one, "MKL_NUM_THREADS": one}


def _tail(path: Path, limit: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size > limit:
            fh.seek(size - limit)
        data = fh.read(limit)
    text = data.decode("utf-8", "replace")
    return (f"[… {size - limit} bytes cut] " + text) if size > limit else text


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(program: str, test: str | None = None, *, timing: dict | None = None,
        limits: Limits = Limits(), python: str | None = None) -> ExecResult:
    """Run ``program`` then ``test`` (asserts) in a fresh confined process.

    timing: optional ``{"setup", "stmt", "reference", "repeats", "budget_s", "min_batch_s"}``:
    when the tests pass, ``stmt`` (after an untimed ``setup``) is timed in batches against the
    reference program's namespace in the same process, interleaved, ``repeats`` times or until
    ``budget_s`` is spent; :class:`Timing` holds the per-call seconds. The wall-clock limit
    then grows by ``budget_s`` plus the calibration's worst case.
    """
    wall = limits.timeout_s + (2 * float(timing["budget_s"]) + 1 if timing else 0)
    cpu = limits.cpu_s or math.ceil(wall) + 1
    tmp = tempfile.mkdtemp(prefix="mlproject-sandbox-")
    try:
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        read_fd, write_fd = os.pipe()
        job = {"program": program, "test": test, "timing": timing, "workdir": work,
               "result_fd": write_fd,
               "limits": {"cpu_s": cpu, "memory_mb": limits.memory_mb,
                          "max_procs": limits.max_procs, "file_size_mb": limits.file_size_mb,
                          "landlock": limits.landlock}}
        t0 = time.perf_counter()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [python or sys.executable, "-I", "-B", str(CHILD)], stdin=subprocess.PIPE,
                    stdout=out, stderr=err, cwd=work, env=clean_env(work),
                    start_new_session=True, pass_fds=(write_fd,), close_fds=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            # marshal: the child loads it without importing json (10 ms of start-up saved)
            raw, timed_out = _exchange(proc, read_fd, marshal.dumps(job), t0 + wall)
        finally:
            os.close(read_fd)
            _kill_group(proc.pid)  # on timeout, and whatever a finished program left behind
            proc.wait()
        wall_s = time.perf_counter() - t0
        res = _result(raw, proc.returncode, timed_out, wall, cpu)
        res.wall_s = wall_s
        res.stdout = _tail(out_path, limits.output_bytes)
        res.stderr = _tail(err_path, limits.output_bytes)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(proc: subprocess.Popen, read_fd: int, job: bytes, deadline: float) -> tuple[bytes, bool]:
    """Send the job, then wait on the result pipe: the child writes one JSON line and exits.

    Waiting on the pipe (not ``Popen.wait(timeout)``, which polls with sleeps of up to 50 ms)
    returns as soon as the result is there, or at EOF when the child died without one.
    Returns (result bytes, timed out).
    """
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except BrokenPipeError:  # died before reading its job: EOF on the pipe tells the rest
        pass
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.perf_counter()
        if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
            return buf, True
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        buf += chunk
    return buf, False


def _result(raw: bytes, rc: int, timed_out: bool, wall: float, cpu: int) -> ExecResult:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("status") in STATUSES:
        t = data.get("timing")
        timing = None
        if isinstance(t, dict):
            timing = Timing(cand=list(t.get("cand") or []), ref=list(t.get("ref") or []),
                            ref_status=t.get("ref_status"),
                            error=t.get("error") or t.get("ref_error") or "")
        return ExecResult(status=data["status"], error=data.get("error", ""), returncode=rc,
                          timing=timing, setup_s=data.get("setup_s"), run_s=data.get("run_s"),
                          landlock=int(data.get("landlock") or 0))
    if timed_out:
        return ExecResult("timeout", f"killed after {wall:.1f} s (wall clock)", rc)
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name
        if -rc == signal.SIGXCPU:
            return ExecResult("cpu_limit", f"killed by {name} (CPU limit {cpu} s)", rc)
        return ExecResult("killed", f"killed by {name}", rc)
    return ExecResult("no_result", f"exited with status {rc} before reporting a result", rc)
