"""Reuse keys (exact, chained, code-aware), one meaning per parameter name, and per-step peak memory."""

import dataclasses
import subprocess

import pytest

from mlproject import reuse
from mlproject.config import EvaluateConfig, QuantizeConfig


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("X = 1\n")
    (root / "README.md").write_text("readme\n")
    git(root, "init", "-q")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def test_a_dirty_src_change_changes_the_code_version(repo):
    clean = reuse.code_version(repo)
    assert len(clean) == 12 and "+dirty" not in clean
    (repo / "README.md").write_text("edited outside src\n")
    assert reuse.code_version(repo) == clean  # only src/ counts
    (repo / "src" / "pkg" / "mod.py").write_text("X = 2\n")
    dirty = reuse.code_version(repo)
    assert dirty.startswith(clean + "+dirty.")
    (repo / "src" / "pkg" / "mod.py").write_text("X = 3\n")
    assert reuse.code_version(repo) not in (clean, dirty)  # the content, not just "dirty"
    (repo / "src" / "pkg" / "mod.py").write_text("X = 1\n")
    assert reuse.code_version(repo) == clean
    (repo / "src" / "pkg" / "new.py").write_text("Y = 1\n")  # untracked files count too
    assert reuse.code_version(repo) != clean
    # and the key follows the code version
    params = reuse.canonical_params(EvaluateConfig(model="smollm2"))
    assert reuse.step_key("evaluate", params, code=clean) != reuse.step_key("evaluate", params, code=dirty)


def test_keys_are_exact_and_chain_upstream_keys(tmp_path):
    libs = {"torch": "1"}
    a = reuse.canonical_params(EvaluateConfig(model="smollm2", limit="10"))
    b = reuse.canonical_params(EvaluateConfig(model="smollm2", limit="11"))
    assert reuse.step_key("evaluate", a, "c", libs) != reuse.step_key("evaluate", b, "c", libs)
    assert reuse.step_key("evaluate", a, "c", libs) == reuse.step_key("evaluate", dict(a), "c", libs)
    assert reuse.step_key("evaluate", a, "c", libs) != reuse.step_key("evaluate", a, "c", {"torch": "2"})
    assert reuse.step_key("evaluate", a, "c", libs) != reuse.step_key("quantize", a, "c", libs)
    # where a run was recorded does not matter; what it computes does
    c = reuse.canonical_params(EvaluateConfig(model="smollm2", limit="10", experiment="x", run_name="y"))
    assert c == a
    # a run reference counts by the key of the run behind it, not by its id
    keys = {"1" * 32: "k-upstream", "2" * 32: "k-upstream", "3" * 32: "k-other"}

    def upstream(ref):
        return keys.get(ref[len("runs:/"):].split("/")[0])

    one = reuse.canonical_params(QuantizeConfig(model=f"runs:/{'1' * 32}/model"), upstream_key=upstream)
    two = reuse.canonical_params(QuantizeConfig(model=f"runs:/{'2' * 32}/model"), upstream_key=upstream)
    other = reuse.canonical_params(QuantizeConfig(model=f"runs:/{'3' * 32}/model"), upstream_key=upstream)
    assert one == two and one["model"] == "key:k-upstream/model" and one != other
    # a local file counts by its content
    text = tmp_path / "ppl.txt"
    text.write_text("some text")
    first = reuse.canonical_params(EvaluateConfig(ppl_dataset=str(text)))
    text.write_text("other text")
    assert reuse.canonical_params(EvaluateConfig(ppl_dataset=str(text))) != first


def test_one_name_means_one_thing_across_steps():
    """A pipeline-wide value reaches every step with that parameter, so a shared name must
    mean the same there. `method` is each step's own algorithm (quantize: rtn/bnb; finetune:
    sft/dpo): a pipeline refuses it pipeline-wide (test_pipeline); `experiment` / `run_name`
    say where a run is recorded and are not pipeline values."""
    from mlproject.steps import STEPS

    seen: dict[str, tuple[str, str]] = {}
    for name, info in STEPS.items():
        for f in dataclasses.fields(info.config_class()):
            if f.name in ("method", "experiment", "run_name"):
                continue
            help_text = f.metadata.get("help", "")
            if f.name in seen:
                assert help_text == seen[f.name][1], f"{f.name!r} differs between {seen[f.name][0]} and {name}"
            else:
                seen[f.name] = (name, help_text)
    # the two names that used to mean two things
    assert "lm-eval batch size" in seen["batch_size"][1]
    assert "PEFT adapter" in seen["adapter"][1]


def test_peak_memory_is_the_steps_own_not_the_process_lifetime():
    import numpy as np

    from mlproject.steps.shared.runs import PeakMemory

    with PeakMemory() as big:
        block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
        block[::512] = 2.0
        big_peak = big.peak()["peak_rss_mb"]
    del block
    with PeakMemory() as small:
        small_block = np.ones(20 * 2**20 // 8)
        small_peak = small.peak()["peak_rss_mb"]
    del small_block
    # The old figure, the process-lifetime maximum (ru_maxrss without a reset), would report the
    # 400 MB block for the second step too.
    assert big_peak >= 400 and small_peak < big_peak - 300
