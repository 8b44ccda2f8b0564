"""Bad input: one line naming the bad value, exit code 2, nothing heavy, no run left RUNNING."""

import subprocess
import sys

import pytest

from conftest import assert_bad_input
from mlproject import cli

BAD = [
    (["--model", "mistrall"], "mistrall"),
    (["--model", "runs:/xyz"], "runs:/xyz"),
    (["--model", "runs:/0123456789abcdef0123456789abcdef/model"], "0123456789abcdef0123456789abcdef"),
    (["--model", "models:/nosuch@best_acc"], "nosuch"),
    (["--tasks", "mlp_capitals,boolqq"], "boolqq"),
    (["--limit", "abc"], "abc"),
    (["--limit", "-3"], "-3"),
    (["--batch-size", "0"], "0"),
    (["--ppl-dataset", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--dtype", "float8"], "float8"),
    (["--device", "tpu"], "tpu"),
    (["--seqlen", "1"], "seqlen"),
    (["--seqlen", "long"], "long"),
    (["--num-fewshot", "-5"], "-5"),
    (["--adapter", "mistral"], "mistral"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(argv, needle, mlflow_uri, tiny_dirs, capsys, monkeypatch):
    exp = "bad-" + "-".join(a.strip("-/") for a in argv)[:60]
    assert_bad_input(["evaluate", "--model", str(tiny_dirs["llama"]), *argv], needle, mlflow_uri, exp,
                     capsys, monkeypatch)


def test_unreachable_tracking_server(tiny_dirs, capsys):
    from mlflow_server import free_port

    uri = f"http://user:s3cret@127.0.0.1:{free_port()}"
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "unreachable" in err and "127.0.0.1" in err
    assert "s3cret" not in err


def test_cuda_request_without_cuda(tiny_dirs, mlflow_uri, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = cli.main(["evaluate", "--model", str(tiny_dirs["llama"]), "--device", "cuda", "--tracking-uri", mlflow_uri])
    assert rc == 2 and "cuda" in capsys.readouterr().err


def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys; from mlproject import cli; cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'mlflow') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_says_each_default_once():
    import re

    text = cli.build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    flat = re.sub(r"\s+", " ", text)
    assert "(default: )" not in flat and "(default: None)" not in flat
    assert flat.count("(default: smollm2)") == 1 and "(default: all)" in flat and "(default: none)" in flat
    for option in re.split(r" --", flat)[1:]:
        assert option.count("(default") <= 1, option


def test_numbers_are_rounded_for_reading():
    from mlproject.steps import StepResult

    text = cli._summary(StepResult(step="evaluate", run_id="", metrics={
        "eval_seconds": 1409.2121943470001, "ppl/offline": 3.896312, "avg_acc": 0.41333333, "params_b": 0.134515008,
        "peak_rss_mb": 1234.56789, "mlp_nonce/acc_norm_stderr": 0.0123}))
    assert text.splitlines() == ["run_id: ", "avg_acc: 0.4133", "eval_seconds: 1,409.2", "params_b: 0.1345",
                                 "peak_rss_mb: 1,234.6", "ppl/offline: 3.896"]
