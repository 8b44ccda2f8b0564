"""A real `mlproject evaluate` in a child process that stops at the start of its perplexity
pass until the test says go: the test can hurt the tracking server, or the process, at a
known point of the step without depending on timing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from conftest import subprocess_env

VICTIM = textwrap.dedent("""
    import pathlib, signal, sys, time
    # Ctrl-C as in a terminal, whatever the test runner's disposition: a process started in the
    # background by a shell without job control inherits SIGINT *ignored* (a CI run started
    # with `&` hung here for that reason).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from mlproject import cli
    from mlproject.evaluation import perplexity

    reached, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    original = perplexity.perplexity

    def gated(*args, **kwargs):
        reached.touch()
        while not go.exists():
            time.sleep(0.05)
        return original(*args, **kwargs)

    perplexity.perplexity = gated
    sys.exit(cli.main(sys.argv[3:]))
""")


def launch(tmp_path, uri, tiny_dir, ppl_file, experiment, **env):
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    reached, go = tmp_path / "reached", tmp_path / "go"
    argv = [sys.executable, str(script), str(reached), str(go), "evaluate", "--model", str(tiny_dir),
            "--tasks", "mlp_capitals", "--limit", "4", "--batch-size", "4", "--ppl-dataset", str(ppl_file),
            "--seqlen", "32", "--tracking-uri", uri, "--experiment", experiment, "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(MLPROJECT_SPOOL=str(tmp_path / "spool"), **env))
    deadline = time.monotonic() + 180
    while not reached.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            proc.kill()
            raise AssertionError(f"the step never reached its perplexity pass:\n{err[-3000:]}")
        time.sleep(0.1)
    return proc, go
