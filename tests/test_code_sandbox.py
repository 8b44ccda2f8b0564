"""The code sandbox with canned completions: every hostile or broken program fails its own
problem with a clear status and nothing escapes into the evaluating process."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from mlproject.evaluation.code import sandbox
from mlproject.evaluation.code.sandbox import Limits

ADD = "def add(a, b):\n"
TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
FAST = Limits(timeout_s=1.5, memory_mb=256)
SECRETS = {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwx", "MLFLOW_TRACKING_PASSWORD": "hunter2-pw",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-value-42", "MLFLOW_TRACKING_URI": "http://u:p@h"}


def run(body: str, test: str = TEST, limits: Limits = FAST, **kw) -> sandbox.ExecResult:
    return sandbox.run(ADD + body, test, limits=limits, **kw)


@pytest.mark.parametrize("body, status", [
    ("    return a + b\n", "passed"),
    ("    return a * b\n", "wrong_answer"),
    ("    return a +\n", "syntax_error"),
    ("    return undefined_name\n", "error"),
    ("    return add(a, b)\n", "error"),                   # RecursionError
    ("    raise SystemExit(0)\n", "exit"),                 # exit(0) is not a pass
    ("    import os\n    os._exit(0)\n", "no_result"),    # neither is leaving without a word
    ("    import faulthandler\n    faulthandler._sigsegv()\n", "killed"),  # a hard crash
])
def test_outcome_of_canned_completions(body, status):
    res = run(body)
    assert res.status == status, res
    assert res.passed == (status == "passed")


def test_infinite_loop_is_killed_by_the_wall_clock():
    res = run("    while True:\n        pass\n", limits=Limits(timeout_s=1.0, memory_mb=256))
    assert res.status == "timeout" and not res.passed
    assert 1.0 <= res.wall_s < 5.0


def test_cpu_limit_stops_a_busy_program_before_a_long_wall_clock():
    # the status says which limit fired (the wall clock would give "timeout")
    res = run("    while True:\n        pass\n", limits=Limits(timeout_s=60, cpu_s=1))
    assert res.status == "cpu_limit", res


def test_sleeping_program_and_its_children_are_killed():
    res = run("    import time\n    time.sleep(60)\n", limits=Limits(timeout_s=1.0))
    assert res.status == "timeout"


@pytest.mark.parametrize("body", [
    "    x = bytearray(10 ** 11)\n    return a + b\n",
    "    xs = []\n    while True:\n        xs.append(' ' * 10 ** 7)\n",
])
def test_huge_allocation_fails_with_memory(body):
    res = run(body, limits=Limits(timeout_s=10, memory_mb=256))
    assert res.status == "memory", res


@pytest.mark.parametrize("bomb", [
    "    import os\n    while True:\n        os.fork()\n",
    "    import subprocess, sys\n    while True:\n        subprocess.Popen([sys.executable, '-c', '0'])\n",
    "    import os\n    os.system('true')\n",
    "    import ctypes\n    ctypes.CDLL(None).fork()\n",
])
def test_process_creation_is_refused(bomb):
    res = run(bomb)
    assert res.status == "forbidden", res
    assert "sandbox:" in res.error


@pytest.mark.skipif(os.geteuid() == 0, reason="the kernel ignores RLIMIT_NPROC for root")
def test_process_limit_is_set_for_unprivileged_users():
    res = run("    import resource\n    return resource.getrlimit(resource.RLIMIT_NPROC)[0]\n",
              test="assert 0 < add(1, 2) < 10**6")
    assert res.passed, res


def test_no_secret_reaches_the_program(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    body = ("    import os, json\n    print(json.dumps(dict(os.environ)))\n    return a + b\n")
    res = run(body)
    assert res.passed
    env = json.loads(res.stdout.splitlines()[0])
    assert set(env) == set(sandbox.clean_env("x"))  # built from scratch, nothing inherited
    for value in SECRETS.values():
        assert value not in res.stdout and value not in res.stderr
    # the evaluating process's environment, read through /proc, is refused too
    res = run("    import os\n    return open(f'/proc/{os.getppid()}/environ', 'rb').read()\n",
              test="assert b'hf_' in add(1, 2)")
    assert res.status in ("forbidden", "error") and not res.passed
    assert "ermission" in res.error or "sandbox:" in res.error


def test_a_secret_the_test_expects_cannot_be_read(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    res = run("    import os\n    return os.environ.get('HF_TOKEN')\n",
              test=f"assert add(1, 2) == {SECRETS['HF_TOKEN']!r}")
    assert res.status == "wrong_answer"


def test_writing_outside_the_temporary_directory_fails(tmp_path):
    target = tmp_path / "outside.txt"
    for body in (f"    open({str(target)!r}, 'w').write('x')\n    return a + b\n",
                 f"    import os\n    os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n"
                 "    return a + b\n",
                 f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n    return a + b\n"):
        res = run(body)
        assert not res.passed and res.status in ("forbidden", "error"), res
        assert "ermission" in res.error or "sandbox:" in res.error
    assert tmp_path.is_dir() and not target.exists()
    # its own directory is writable (and removed afterwards)
    res = run("    import os\n    open('scratch.txt', 'w').write('x')\n"
              "    print(os.getcwd())\n    return a + b\n")
    assert res.passed
    assert not os.path.exists(res.stdout.strip())


def test_parent_cannot_be_signalled():
    res = run(f"    import os\n    os.kill({os.getpid()}, {int(signal.SIGTERM)})\n")
    assert res.status == "forbidden"  # and this test process is still alive to assert it


def test_network_is_refused():
    res = run("    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert res.status == "forbidden", res


def test_kernel_confinement_where_landlock_exists():
    res = run("    return open('/etc/hostname').read()\n", test="add(1, 2)")
    if res.landlock == 0:
        pytest.skip("this kernel has no Landlock")
    assert res.status == "error" and "PermissionError" in res.error  # refused by the kernel


def test_output_is_captured_and_truncated():
    res = run("    import sys\n    print('o' * 100000)\n    print('e' * 100000, file=sys.stderr)\n"
              "    return a + b\n", limits=Limits(timeout_s=5, output_bytes=500))
    assert res.passed
    assert len(res.stdout) < 600 and res.stdout.rstrip().endswith("o" * 100)
    assert "bytes cut" in res.stdout and "bytes cut" in res.stderr


def test_oversized_file_write_fails_with_the_file_size_limit():
    res = run("    open('big.bin', 'wb').write(b'x' * (3 * 2**20))\n    return a + b\n",
              limits=Limits(timeout_s=5, file_size_mb=1))
    assert res.status == "error" and "File too large" in res.error, res


def test_timing_compares_with_the_reference_in_the_same_process():
    timing = {"setup": "data = list(range(200))", "stmt": "add(data, data)",
              "reference": ADD + "    return a + b\n", "repeats": 3, "budget_s": 2,
              "min_batch_s": 0.002}
    res = run("    return a + b\n", timing=timing, limits=Limits(timeout_s=5))
    assert res.passed and res.timing is not None
    assert len(res.timing.cand) == len(res.timing.ref) == 3
    assert res.timing.ratio == pytest.approx(res.timing.cand_s / res.timing.ref_s)
    # the program must still pass before it is timed
    res = run("    return a - b\n", timing=timing)
    assert res.status == "wrong_answer" and res.timing is None


def test_the_evaluating_process_is_untouched():
    before = (os.getcwd(), dict(os.environ), sys.getrecursionlimit())
    run("    import os, sys\n    os.chdir('/')\n    sys.setrecursionlimit(50)\n    return a + b\n")
    assert (os.getcwd(), dict(os.environ), sys.getrecursionlimit()) == before
