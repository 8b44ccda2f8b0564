"""The shipped offline data: reproducible, well-formed, train/test disjoint, loadable by lm-eval."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from mlproject.evaluation.tasks import BUNDLED_TASKS, OFFLINE_TASKS, include_path, tasks_root
from mlproject.training.data import offline_datasets

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_offline_data.py"
PPL_TEXT = REPO / "src" / "mlproject" / "evaluation" / "data" / "offline_ppl.txt"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_offline_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def docs(task: str, split: str = "test") -> list[dict]:
    return load_jsonl(tasks_root() / task / f"{split}.jsonl")


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_committed_files_match_generator(hashseed):
    # A fresh interpreter with a different hash seed: the output must not depend on set/dict
    # iteration order of str hashes.
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_check_reports_edited_missing_and_stale_files(gen, tmp_path):
    assert gen.main(["--root", str(tmp_path)]) == 0
    assert gen.main(["--check", "--root", str(tmp_path)]) == 0
    test_file = tmp_path / gen.TASKS_DIR / "mlp_arith" / "test.jsonl"
    test_file.write_text(test_file.read_text().replace('"label": 0', '"label": 1', 1))
    (tmp_path / gen.EVAL_DATA_DIR / "offline_ppl.txt").unlink()
    (tmp_path / gen.TRAIN_DATA_DIR / "sft_old.jsonl").write_text("{}\n")
    problems = gen.check(gen.build(), tmp_path)
    assert sorted(problems) == [
        f"differs: {gen.TASKS_DIR}/mlp_arith/test.jsonl",
        f"missing: {gen.EVAL_DATA_DIR}/offline_ppl.txt",
        f"not generated (stale?): {gen.TRAIN_DATA_DIR}/sft_old.jsonl",
    ]
    assert gen.main(["--check", "--root", str(tmp_path)]) == 1


def test_every_task_folder_is_registered():
    folders = sorted(p.name for p in tasks_root().iterdir() if (p / f"{p.name}.yaml").is_file())
    assert folders == sorted(BUNDLED_TASKS)


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_task_documents_are_valid(task):
    cfg = yaml.safe_load((tasks_root() / task / f"{task}.yaml").read_text())
    assert cfg["task"] == task and cfg["output_type"] == "multiple_choice"
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    test, val = docs(task, "test"), docs(task, "validation")
    assert len(test) >= 200 and len(val) >= 8
    for d in test + val:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4, d
        assert 0 <= d["label"] < 4, d
        assert not d["query"].endswith(" ") and not d["choices"][d["label"]].startswith(" ")
    assert len({d["id"] for d in test + val}) == len(test) + len(val)
    assert not {d["query"] for d in test} & {d["query"] for d in val}
    # Every answer position is used, so "always pick choice k" cannot score well.
    counts = [sum(d["label"] == k for d in test) for k in range(4)]
    assert min(counts) >= len(test) // 8, counts


def test_answers_are_correct():
    for d in docs("mlp_arith"):
        a, b = d["a"], d["b"]
        assert int(d["choices"][d["label"]]) == {"+": a + b, "-": a - b, "*": a * b}[d["op"]] == d["result"]
    for d in docs("mlp_capitals"):
        want = d["capital"] if d["direction"] == "country_to_capital" else d["country"]
        assert d["choices"][d["label"]] == want
    labels = {"animal": "wug", "food": "dax", "object": "fep", "job": "zib"}
    for d in docs("mlp_nonce"):
        assert d["choices"] == ["wug", "dax", "fep", "zib"]
        assert d["choices"][d["label"]] == labels[d["category"]]


def test_finetuning_sets_are_disjoint_from_evaluation():
    sets = offline_datasets()
    assert set(sets) >= {"sft_mlp_nonce", "dpo_mlp_nonce", "sft_mlp_arith", "dpo_mlp_arith"}
    for name, path in sets.items():
        if name == "sft_text":
            continue  # plain text, not a task's prompts: test_text_set_is_held_out_from_the_ppl_text
        kind, task = name.split("_", 1)
        rows = load_jsonl(path)
        assert task in OFFLINE_TASKS and len(rows) >= 100, name
        eval_prompts = {d["query"] for d in docs(task, "test") + docs(task, "validation")}
        assert not {r["prompt"] for r in rows} & eval_prompts, name
        if kind == "sft":
            assert all(set(r) == {"prompt", "completion"} and r["completion"].startswith(" ")
                       for r in rows), name
        else:
            assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
                       for r in rows), name
    nonce = load_jsonl(sets["sft_mlp_nonce"])
    assert len(nonce) >= 300
    train_words = {r["prompt"].split("\n")[0].removeprefix("Word: ") for r in nonce}
    eval_words = {d["word"] for d in docs("mlp_nonce") + docs("mlp_nonce", "validation")}
    assert not train_words & eval_words
    dpo = {r["prompt"]: r for r in load_jsonl(sets["dpo_mlp_nonce"])}
    assert all(dpo[r["prompt"]]["chosen"] == r["completion"] for r in nonce)


def test_text_set_is_held_out_from_the_ppl_text():
    rows = load_jsonl(offline_datasets()["sft_text"])
    assert len(rows) >= 300 and all(set(r) == {"text"} and r["text"].strip() for r in rows)
    ppl_paragraphs = set(PPL_TEXT.read_text(encoding="utf-8").split("\n\n"))
    texts = [r["text"] for r in rows]
    assert not set(texts) & ppl_paragraphs  # same generator, other draws, overlaps dropped
    assert len(set(texts)) / len(texts) > 0.9


def test_ppl_text_is_long_prose():
    text = PPL_TEXT.read_text(encoding="utf-8")
    words = text.split()
    assert len(words) >= 16_000
    assert text.isascii() and "{" not in text and "  " not in text
    # Mostly distinct sentences, not one template repeated.
    sentences = [s for s in text.replace("\n", " ").split(". ") if s]
    assert len(set(sentences)) / len(sentences) > 0.8


def test_include_path_rewrites_data_files_to_absolute_paths(tmp_path):
    first = include_path(cache_dir=tmp_path)
    assert include_path(cache_dir=tmp_path) == first  # reused, not rebuilt
    for task in OFFLINE_TASKS:
        cfg = yaml.safe_load((first / task / f"{task}.yaml").read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        assert set(files) == {"test", "validation"}
        for path in files.values():
            assert Path(path).is_absolute() and Path(path).is_file()
            assert Path(path).parent == tasks_root() / task
    # A damaged cache folder is rebuilt rather than handed to lm-eval.
    (first / OFFLINE_TASKS[0] / f"{OFFLINE_TASKS[0]}.yaml").unlink()
    assert include_path(cache_dir=tmp_path) == first
    assert (first / OFFLINE_TASKS[0] / f"{OFFLINE_TASKS[0]}.yaml").is_file()


def test_include_path_is_safe_under_concurrency(tmp_path):
    # Rounds of callers released together, on an empty cache and on a damaged one (a tmp cleaner
    # removed a file): every caller must get the same whole folder and none may fail. The racy
    # windows are microseconds wide, so this catches a regression only sometimes; the test
    # below replays the interleaving behind the old failure deterministically.
    real_name = include_path(cache_dir=tmp_path / "probe").name
    for round_ in range(8):
        base = tmp_path / f"round{round_}"
        if round_ % 2:
            damaged = base / real_name / BUNDLED_TASKS[0]
            damaged.mkdir(parents=True)
            (damaged / "stale.txt").write_text("left by a tmp cleaner's partial sweep")
        barrier = threading.Barrier(8)
        results, errors = [], []

        def call():
            barrier.wait()
            try:
                path = include_path(cache_dir=base)
                # The folder handed back is whole now, not only once every caller is done.
                assert all((path / t / f"{t}.yaml").is_file() for t in BUNDLED_TASKS), path
                results.append(path)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"round {round_}: {errors!r}"
        assert len(results) == 8 and len(set(results)) == 1
        assert [p.name for p in base.iterdir()] == [real_name]  # no leftover temp folders


def test_include_path_never_removes_a_folder_another_caller_completed(tmp_path, monkeypatch):
    # The interleaving behind the old failure (OSError 39 in a suite run), made deterministic:
    # this caller looked (incomplete) just before another caller renamed its finished copy into
    # place. The old code then deleted that folder as "partial", from under the callers already
    # using it, while a third caller's failed rename found it half-deleted and raised. A loser
    # must discard only its own copy and use the winner's.
    import mlproject.evaluation.tasks as tasks

    done = include_path(cache_dir=tmp_path)
    # An open descriptor keeps the inode alive, so a deleted-and-rebuilt folder cannot reuse it.
    fd = os.open(done, os.O_RDONLY)
    try:
        real, looks = tasks._complete, []

        def stale_first_look(path):
            looks.append(path)
            return False if len(looks) == 1 else real(path)

        monkeypatch.setattr(tasks, "_complete", stale_first_look)
        assert include_path(cache_dir=tmp_path) == done
        held = os.fstat(fd)
        assert held.st_nlink > 0 and done.stat().st_ino == held.st_ino and real(done)
    finally:
        os.close(fd)
    assert [p.name for p in tmp_path.iterdir()] == [done.name]


def test_lm_eval_finds_and_runs_the_tasks_from_another_cwd(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import tiny

    monkeypatch.chdir(tmp_path)
    tm = TaskManager(include_path=str(include_path()), include_defaults=False)
    assert set(OFFLINE_TASKS) <= set(tm.all_subtasks)
    lm = HFLM(pretrained=tiny.make_model("llama"), tokenizer=tiny.make_tokenizer(), batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(OFFLINE_TASKS), task_manager=tm, limit=8,
                                  log_samples=False)
    for task in OFFLINE_TASKS:
        res = out["results"][task]
        assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
        assert out["n-samples"][task]["effective"] == 8


def test_committed_yaml_paths_work_from_the_repository_root():
    # `lm_eval --include_path src/mlproject/evaluation/tasks` from a checkout.
    for task in BUNDLED_TASKS:
        cfg = yaml.safe_load((tasks_root() / task / f"{task}.yaml").read_text())
        for rel in cfg["dataset_kwargs"]["data_files"].values():
            assert not Path(rel).is_absolute() and (REPO / rel).is_file()


def test_offline_datasets_resolve_names():
    sets = offline_datasets()
    assert all(p.is_file() and p.suffix == ".jsonl" and p.stem == name for name, p in sets.items())
