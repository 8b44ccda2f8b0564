"""The sandboxed side of :mod:`mlproject.evaluation.code.sandbox`: one program, one process.

Executed as a script (``python -I -B _child.py``), never imported by the evaluating process.
Standard library only, and no module that starts processes (``ctypes.util`` would import
``subprocess``); no ``json``, ``signal`` or ``re`` either: their imports (enum, re) would
double the start-up time of every program. It reads one job (``marshal``, written by the
parent) on stdin, confines itself, runs the program and its
tests, optionally times the program against a reference on a timing input, writes one JSON
result to the file descriptor the parent passed, and leaves with ``os._exit`` (so atexit
handlers the program registered never run).

Confinement, in order (each layer is described in README "Running generated code"):

1. resource limits: CPU seconds, address space, processes (non-root users only: the kernel
   exempts root), file size (SIGXFSZ ignored, so an oversized write fails with EFBIG instead
   of killing the process), no core files, open files;
2. Landlock (Linux >= 5.13, unprivileged, kernel-enforced): reads only below Python's own
   installation and the system library folders, writes only below the working directory;
   TCP bind/connect refused (ABI >= 4); signals to processes outside the sandbox refused
   (ABI >= 6). Skipped where the kernel lacks it;
3. a Python audit hook (best effort; PEP 578 hooks are no security boundary): no process
   creation, no ctypes/cffi, no rlimit changes, no signals to other processes, no sockets,
   no writes outside the working directory and no reads of other processes' /proc entries.
   This is the only layer that still stops a fork bomb when the evaluation runs as root.
"""

import _signal
import builtins
import gc
import marshal
import os
import resource
import sys
import time


class SandboxViolation(PermissionError):
    """Raised by the audit hook; its message starts with 'sandbox:'."""


# ----------------------------------------------------------------------------- limits

def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _limit(which, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, cur = resource.getrlimit(which)
    if cur != resource.RLIM_INFINITY:  # an unprivileged process cannot raise its hard limit
        soft, hard = min(soft, cur), min(hard, cur)
    resource.setrlimit(which, (soft, hard))


def _set_limits(lim: dict) -> dict:
    cpu = int(lim["cpu_s"])
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL 1 s later
    _limit(resource.RLIMIT_AS, int(lim["memory_mb"]) * 2**20)
    _limit(resource.RLIMIT_FSIZE, int(lim["file_size_mb"]) * 2**20)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, 256)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    nproc = None
    if os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC") and os.path.isdir("/proc"):
        # RLIMIT_NPROC counts every process of this user, not just ours (root is exempt).
        nproc = _user_process_count() + int(lim["max_procs"])
        _limit(resource.RLIMIT_NPROC, nproc)
    return {"nproc": nproc}


# ----------------------------------------------------------------------------- landlock

_FS_ABI_BITS = {1: 13, 2: 14, 3: 15, 4: 15}  # ABI >= 5: 16 access rights
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1, 2, 4, 8
_TRUNCATE = 1 << 14


def _read_roots() -> list:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    roots.update(p for p in sys.path if p)
    roots.update(("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache",
                  "/dev/urandom", "/dev/zero"))
    out = set()
    for p in roots:
        out.add(p)
        out.add(os.path.realpath(p))
    return sorted(p for p in out if os.path.exists(p))


def _landlock(workdir: str) -> int:
    """Restrict this process (and children) with Landlock; returns the ABI used, 0 if none."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # The same numbers on every architecture (new syscalls share one table since 5.x).
    create, add_rule, restrict = 444, 445, 446
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    handled = (1 << _FS_ABI_BITS.get(abi, 16)) - 1
    attr = RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    try:
        def allow(path: str, access: int) -> None:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path):  # files take file rights only
                    access &= _EXECUTE | _WRITE_FILE | _READ_FILE | (_TRUNCATE if abi >= 3 else 0)
                rule = PathBeneath(access & handled, pfd)
                # a rule the kernel refuses only narrows what the program may touch: go on
                libc.syscall(add_rule, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule),
                             ctypes.c_uint32(0))
            finally:
                os.close(pfd)

        for root in _read_roots():
            allow(root, _EXECUTE | _READ_FILE | _READ_DIR)
        allow("/dev/null", _READ_FILE | _WRITE_FILE | _TRUNCATE)
        allow(workdir, handled)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return 0
        if libc.syscall(restrict, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return 0
        return abi
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- audit hook

_REFUSED_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "resource.setrlimit", "resource.prlimit", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr",
}
_REFUSED_IMPORTS = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess"}
_WRITE_EVENTS = {  # event -> indices of the path arguments it writes
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
    "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
    "os.lchmod": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
    "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _install_audit_hook(workdir: str) -> None:
    work = os.path.realpath(workdir)
    me = str(os.getpid())
    busy = []  # re-entrancy guard: realpath itself may raise audit events

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        full = os.path.realpath(os.path.join(os.getcwd(), str(path)))
        return full == work or full.startswith(work + os.sep) or full == "/dev/null"

    def foreign_proc(path) -> bool:
        if isinstance(path, int):
            return False
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        full = os.path.realpath(os.path.join(os.getcwd(), str(path)))
        parts = full.split(os.sep)
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != me

    def hook(event, args):
        if busy:
            return
        if event in _REFUSED_EVENTS:
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in _REFUSED_IMPORTS:
            raise SandboxViolation(f"sandbox: import of {args[0]} is not allowed")
        if event == "open" or event in _WRITE_EVENTS:
            busy.append(1)
            try:
                if event == "open":
                    path, mode, flags = (tuple(args) + (None, None, 0))[:3]
                    writes = bool((flags or 0) & _WRITE_FLAGS) or any(
                        c in (mode or "") for c in "wax+")
                    if writes and not inside(path):
                        raise SandboxViolation(f"sandbox: writing {path!r} outside the "
                                               "working directory is not allowed")
                    if foreign_proc(path):
                        raise SandboxViolation(f"sandbox: reading {path!r} is not allowed")
                else:
                    for i in _WRITE_EVENTS[event]:
                        if i < len(args) and args[i] is not None and not inside(args[i]):
                            raise SandboxViolation(f"sandbox: {event} on {args[i]!r} outside "
                                                   "the working directory is not allowed")
            finally:
                busy.pop()

    sys.addaudithook(hook)


# ----------------------------------------------------------------------------- running

def _classify(exc: BaseException, phase: str) -> str:
    if isinstance(exc, SandboxViolation):
        return "forbidden"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, SystemExit):
        return "exit"
    if isinstance(exc, SyntaxError) and phase == "compile":
        return "syntax_error"
    if isinstance(exc, AssertionError) and phase == "test":
        return "wrong_answer"
    return "error"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:1000]


def _namespace() -> dict:
    # Not "__main__": a program's `if __name__ == "__main__":` block must not run.
    return {"__name__": "__candidate__", "__builtins__": builtins}


def _load(program: str, test: str | None):
    """Compile and run ``program`` (then ``test``) in a fresh namespace; (ns, status, error)."""
    ns = _namespace()
    phase = "compile"
    try:
        code = compile(program, "<program>", "exec", dont_inherit=True)
        phase = "program"
        exec(code, ns)  # noqa: S102 - this process exists to run it
        if test:
            phase = "test"
            exec(compile(test, "<test>", "exec", dont_inherit=True), ns)  # noqa: S102
    except BaseException as exc:  # noqa: BLE001 - every way a program can fail is a result
        return ns, _classify(exc, phase), _describe(exc), phase
    return ns, "passed", "", phase


def _batch(stmt, g: dict, number: int) -> float:
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            exec(stmt, g)  # noqa: S102
        return time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()


def _calibrate(setup, stmt, ns: dict, min_batch: float, deadline: float) -> int:
    """Calls per batch so that a batch lasts at least ``min_batch`` seconds (timeit-style)."""
    number = 1
    while True:
        g = dict(ns)
        exec(setup, g)  # noqa: S102
        t = _batch(stmt, g, number)
        if t >= min_batch or number >= 100_000 or time.perf_counter() > deadline:
            return number
        number *= 10 if t < min_batch / 20 else 2


def _time(job: dict, cand_ns: dict) -> dict:
    """Median seconds per call of the timing statement, candidate and reference interleaved."""
    t = job["timing"]
    setup = compile(t.get("setup") or "pass", "<timing-setup>", "exec", dont_inherit=True)
    stmt = compile(t["stmt"], "<timing>", "exec", dont_inherit=True)
    start = time.perf_counter()
    deadline = start + float(t["budget_s"])
    out = {"cand": [], "ref": [], "ref_status": None, "ref_error": ""}
    sides = [("cand", cand_ns)]
    if t.get("reference"):
        ref_ns, status, err, _ = _load(t["reference"], None)
        out["ref_status"], out["ref_error"] = status, err
        if status == "passed":
            sides.append(("ref", ref_ns))
    numbers = {}
    for name, ns in sides:  # warm-up and calibration (imports, caches), untimed
        numbers[name] = _calibrate(setup, stmt, ns, float(t["min_batch_s"]), deadline)
    out["number"] = numbers
    for i in range(int(t["repeats"])):
        order = sides if i % 2 == 0 else sides[::-1]  # alternate so drift hits both alike
        for name, ns in order:
            g = dict(ns)
            exec(setup, g)  # noqa: S102 - fresh inputs for every batch, untimed
            out[name].append(_batch(stmt, g, numbers[name]) / numbers[name])
        if time.perf_counter() > deadline:
            break
    return out


def _json(value) -> str:
    """JSON for the result (str, int, float, bool, None, list, dict): the parent parses it
    with ``json.loads``, which stays safe whatever a hostile program makes this process say."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) \
            else "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(str(k))}: {_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    out = []
    for c in str(value):
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def main() -> None:
    t_start = time.perf_counter()
    job = marshal.loads(sys.stdin.buffer.read())
    result_fd = int(job["result_fd"])
    os.set_inheritable(result_fd, False)
    lim = job["limits"]
    res = {"status": "error", "error": "", "phase": "setup", "timing": None}
    try:
        res["nproc"] = _set_limits(lim)["nproc"]
        res["landlock"] = _landlock(job["workdir"]) if lim.get("landlock", True) else 0
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
            del sys.modules[name]  # a later `import ctypes` goes through the audit hook
        _install_audit_hook(job["workdir"])
        res["setup_s"] = time.perf_counter() - t_start
        t0 = time.perf_counter()
        ns, status, err, phase = _load(job["program"], job.get("test"))
        res.update(status=status, error=err, phase=phase, run_s=time.perf_counter() - t0)
        if status == "passed" and job.get("timing"):
            try:
                res["timing"] = _time(job, ns)
            except BaseException as exc:  # noqa: BLE001
                res["timing"] = {"error": _describe(exc), "status": _classify(exc, "timing")}
    except BaseException as exc:  # noqa: BLE001 - the sandbox itself failed: say so
        res.update(status="sandbox_error", error=_describe(exc))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001, S110 - the program may have closed them
        pass
    data = _json(res).encode("utf-8", "replace") + b"\n"  # one line: the parent reads to it
    while data:
        data = data[os.write(result_fd, data):]
    os._exit(0)


if __name__ == "__main__":
    main()
