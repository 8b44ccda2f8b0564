"""Pipelines end to end on tiny models and a real `mlflow server`: parent/child runs, lineage,
reuse (exact keys, no model load), forced reruns, failure and resume, and bad pipeline files."""

import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import mlflow_client
from mlproject import cli
from mlproject.models import loading

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent


def write_pipeline(path: Path, model: Path, ppl: Path, extra_steps: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""\
        name: tiny3
        description: evaluate → quantize → evaluate the quantized model
        params:
          model: {model}
          tasks: none
          ppl_dataset: {ppl}
          seqlen: 32
        steps:
          base:
            step: evaluate
            role: base
          quant:
            step: quantize
            method: rtn
            w_bits: 4
            group_size: 32
            evaluate: false
          after:
            step: evaluate
            model: ${{quant.model_uri}}
        """) + textwrap.dedent(extra_steps))
    return path


class LoadCounter:
    """Counts (or forbids) model loads, wherever the steps call the loader from."""

    def __init__(self, monkeypatch, forbid: bool = False):
        self.calls = []
        original = loading.load_model

        def load(ref, *a, **k):
            if forbid:
                raise AssertionError(f"model loaded: {ref.raw}")
            self.calls.append(ref.raw)
            return original(ref, *a, **k)

        monkeypatch.setattr(loading, "load_model", load)


def run_cli(uri, experiment, *argv):
    return cli.main(["run", *map(str, argv), "--tracking-uri", uri, "--experiment", experiment])


def runs_of(uri, experiment):
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def children(uri, parent_id):
    client = mlflow_client(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])
    return {r.data.tags["mlproject.pipeline_step"]: r for r in runs}


def parents(uri, experiment):
    return [r for r in runs_of(uri, experiment) if r.data.tags.get("mlproject.step") == "pipeline"]


@pytest.fixture
def pipe_file(tmp_path, tiny_dirs, ppl_text_file):
    return write_pipeline(tmp_path / "tiny3.yaml", tiny_dirs["llama"], ppl_text_file)


def test_three_steps_parent_child_and_lineage(pipe_file, mlflow_uri, tiny_dirs, capsys, monkeypatch, caplog):
    import logging

    exp = "pipe-links"
    monkeypatch.setenv("MLPROJECT_PROGRESS", "log")
    monkeypatch.setenv("MLPROJECT_PROGRESS_INTERVAL", "0")
    caplog.set_level(logging.INFO, logger="mlproject.progress")
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    progress = [r.getMessage() for r in caplog.records if r.name == "mlproject.progress"]
    assert any(p.startswith("pipeline tiny3: 2/3 steps (67%) · ") and "ETA" in p for p in progress), progress
    assert any(p.startswith("pipeline tiny3: 3/3 steps (100%) · done in") for p in progress)
    out = capsys.readouterr().out
    (parent,) = parents(mlflow_uri, exp)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline:tiny3"
    assert parent.data.metrics["system/pipeline/steps_run"] == 3 and parent.data.metrics["system/pipeline/steps_reused"] == 0
    kids = children(mlflow_uri, parent.info.run_id)
    assert set(kids) == {"base", "quant", "after"}
    assert all(k.info.status == "FINISHED" and k.info.experiment_id == parent.info.experiment_id
               for k in kids.values())
    quant, after = kids["quant"], kids["after"]
    # lineage: the last evaluation names the quantize run as its upstream and the tiny dir as root
    assert after.data.tags["mlproject.upstream_run"] == quant.info.run_id
    assert after.data.tags["mlproject.model"] == f"runs:/{quant.info.run_id}/model"
    assert after.data.tags["mlproject.base_model"] == str(tiny_dirs["llama"])
    assert kids["base"].data.tags["mlproject.role"] == "base"
    # every child carries its reuse key; the parent holds the resolved file and the report
    assert all(len(k.data.tags["mlproject.cache_key"]) == 24 for k in kids.values())
    artifacts = {a.path for a in mlflow_client(mlflow_uri).list_artifacts(parent.info.run_id)}
    assert {"pipeline.yaml", "report.md"} <= artifacts
    assert quant.info.run_id in out and "ran" in out
    # it ends with where the report is and the UI links (issue 11), the parent describes the steps
    tail = out.strip().splitlines()[-3:]
    assert tail[0].startswith("Report: ") and tail[0].endswith("/report.md") and parent.info.run_id in tail[0]
    assert tail[1] == f"UI: {mlflow_uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert tail[2].endswith("runs?viewStateShareKey=mlproject-headline")
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**pipeline tiny3** · 3 steps (3 run, 0 reused)") and "- **after** (evaluate): " in note
    # quantizing changed the numbers: the two evaluations differ
    assert after.data.metrics["ppl/sample"] != kids["base"].data.metrics["ppl/sample"]


def test_second_run_reuses_every_step_without_loading(pipe_file, mlflow_uri, monkeypatch):
    exp = "pipe-reuse"
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    first = children(mlflow_uri, parents(mlflow_uri, exp)[0].info.run_id)
    LoadCounter(monkeypatch, forbid=True)
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    second_parent = parents(mlflow_uri, exp)[-1]
    assert second_parent.info.status == "FINISHED"
    assert second_parent.data.metrics["system/pipeline/steps_reused"] == 3
    second = children(mlflow_uri, second_parent.info.run_id)
    for name in ("base", "quant", "after"):
        rec = second[name]
        assert rec.data.tags["mlproject.reused_from"] == first[name].info.run_id
        assert rec.data.tags["mlproject.reused_key"] == first[name].data.tags["mlproject.cache_key"]
        assert "mlproject.cache_key" not in rec.data.tags  # a record, not a result of its own
        assert rec.data.metrics == first[name].data.metrics  # the numbers shown in the tree
    # the resolved file points the last step at the first run's quantized model
    text = Path(mlflow_client(mlflow_uri).download_artifacts(second_parent.info.run_id, "pipeline.yaml")).read_text()
    assert yaml.safe_load(text)["steps"]["after"]["model"] == f"runs:/{first['quant'].info.run_id}/model"


def test_every_step_kind_records_the_key_its_plan_computed(tmp_path, tiny_dirs, ppl_text_file, mlflow_uri,
                                                          monkeypatch, caplog):
    """Prune → finetune → quantize → evaluate: each run records the key the plan computed (so a
    rerun reuses them all); finetune's key also holds the launch's world size."""
    path = tmp_path / "kinds.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: kinds
        params: {{model: {tiny_dirs["llama"]}, tasks: none, ppl_dataset: {ppl_text_file}, seqlen: 32}}
        steps:
          pruned: {{step: prune, ratio: 0.25, evaluate: false}}
          tuned:
            step: finetune
            model: ${{pruned.model_uri}}
            dataset: offline:sft_mlp_nonce
            max_steps: 2
            train_batch_size: 2
            eval_after: false
          quant: {{step: quantize, model: "${{tuned.model_uri}}", method: rtn, w_bits: 4, granularity: per_channel, evaluate: false}}
          after: {{step: evaluate, model: "${{quant.model_uri}}"}}
        """))
    exp = "pipe-kinds"
    with caplog.at_level("WARNING", logger="mlproject.pipeline.runner"):
        assert run_cli(mlflow_uri, exp, path) == 0
    assert "planned key" not in caplog.text
    first = children(mlflow_uri, parents(mlflow_uri, exp)[0].info.run_id)
    assert set(first) == {"pruned", "tuned", "quant", "after"}
    LoadCounter(monkeypatch, forbid=True)
    assert run_cli(mlflow_uri, exp, path) == 0
    second = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    for name, run in first.items():
        assert second[name].data.tags["mlproject.reused_from"] == run.info.run_id, name


def test_downstream_change_reuses_upstream_only(pipe_file, mlflow_uri, monkeypatch):
    exp = "pipe-downstream"
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    loads = LoadCounter(monkeypatch)
    monkeypatch.setattr(loading, "LOADS", [])
    assert run_cli(mlflow_uri, exp, pipe_file, "--set", "after.seqlen=16") == 0
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    assert "mlproject.reused_from" in kids["base"].data.tags and "mlproject.reused_from" in kids["quant"].data.tags
    assert "mlproject.reused_from" not in kids["after"].data.tags
    assert kids["after"].data.params["ppl.seqlen"] == "16"
    # the reused quantized model asked for, its recipe re-made from the base: one checkpoint read
    assert loads.calls[0].startswith("runs:/") and len(loads.calls) == 2 and len(loading.LOADS) == 1


def test_upstream_change_recomputes_downstream(pipe_file, mlflow_uri, monkeypatch):
    exp = "pipe-upstream"
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    first = children(mlflow_uri, parents(mlflow_uri, exp)[0].info.run_id)
    loads = LoadCounter(monkeypatch)
    assert run_cli(mlflow_uri, exp, pipe_file, "--set", "quant.w_bits=3") == 0
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    assert "mlproject.reused_from" in kids["base"].data.tags
    for name in ("quant", "after"):
        assert "mlproject.reused_from" not in kids[name].data.tags
        assert kids[name].data.tags["mlproject.cache_key"] != first[name].data.tags["mlproject.cache_key"]
    assert kids["quant"].data.params["w_bits"] == "3" and len(loads.calls) == 2


def test_rerun_forces_a_step_and_what_depends_on_it(pipe_file, mlflow_uri, monkeypatch):
    exp = "pipe-rerun"
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    first = children(mlflow_uri, parents(mlflow_uri, exp)[0].info.run_id)
    assert run_cli(mlflow_uri, exp, pipe_file, "--rerun", "quant") == 0
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    assert "mlproject.reused_from" in kids["base"].data.tags
    assert all("mlproject.reused_from" not in kids[n].data.tags for n in ("quant", "after"))
    # same inputs, same code: the forced rerun carries the same key as the first run
    assert kids["quant"].data.tags["mlproject.cache_key"] == first["quant"].data.tags["mlproject.cache_key"]
    assert run_cli(mlflow_uri, exp, pipe_file, "--no-reuse") == 0
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    assert all("mlproject.reused_from" not in k.data.tags for k in kids.values())


def test_failing_step_fails_the_parent_and_a_rerun_resumes(pipe_file, mlflow_uri, monkeypatch, capsys):
    from mlproject.compression import rtn

    exp = "pipe-fail"

    def boom(*a, **k):
        raise RuntimeError("boom in rtn")

    with monkeypatch.context() as m:
        m.setattr(rtn, "quantize_model", boom)
        assert run_cli(mlflow_uri, exp, pipe_file) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: pipeline tiny3: step 'quant' (quantize) failed: boom in rtn"
    (parent,) = parents(mlflow_uri, exp)
    assert parent.info.status == "FAILED" and "quant" in parent.data.tags["mlproject.error"]
    kids = children(mlflow_uri, parent.info.run_id)
    assert kids["base"].info.status == "FINISHED" and kids["quant"].info.status == "FAILED"
    assert "after" not in kids  # the chain stopped
    assert not any(r.info.status == "RUNNING" for r in runs_of(mlflow_uri, exp))

    loads = LoadCounter(monkeypatch)
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[-1].info.run_id)
    assert kids["base"].data.tags["mlproject.reused_from"] == children(mlflow_uri, parent.info.run_id)[
        "base"].info.run_id
    assert kids["quant"].info.status == "FINISHED" and kids["after"].info.status == "FINISHED"
    assert len(loads.calls) == 2  # quant and after; the base evaluation was not repeated


def test_dry_run_prints_the_plan_and_creates_nothing(pipe_file, mlflow_uri, capsys, monkeypatch):
    exp = "pipe-dry"
    LoadCounter(monkeypatch, forbid=True)
    assert run_cli(mlflow_uri, exp, pipe_file, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run" in out and out.count("| run |") == 3 and "${quant.model_uri}" in out
    assert mlflow_client(mlflow_uri).get_experiment_by_name(exp) is None
    monkeypatch.undo()
    assert run_cli(mlflow_uri, exp, pipe_file) == 0
    capsys.readouterr()
    assert run_cli(mlflow_uri, exp, pipe_file, "--dry-run", "--set", "after.seqlen=16") == 0
    out = capsys.readouterr().out
    kids = children(mlflow_uri, parents(mlflow_uri, exp)[0].info.run_id)
    assert f"reuse {kids['base'].info.run_id}" in out and f"reuse {kids['quant'].info.run_id}" in out
    assert out.count("| run |") == 1  # only `after` would run


BAD_FILES = {
    "unknown step kind": ("steps:\n  a: {step: evalute, model: x}\n", "unknown step 'evalute'"),
    "bad reference": ("steps:\n  a: {step: evaluate}\n  b: {step: evaluate, model: '${nope.model_uri}'}\n",
                      "unknown step 'nope'"),
    "bad field": ("steps:\n  a: {step: evaluate}\n  b: {step: evaluate, model: '${a.modeluri}'}\n",
                  "unknown field 'modeluri'"),
    "cycle": ("steps:\n  a: {step: evaluate, model: '${b.model_uri}'}\n  b: {step: quantize, model: '${a.model_uri}'}\n",
              "cycle: a -> b -> a"),
    "unknown key": ("steps:\n  a: {step: prune, ratoi: 0.3}\n", "has no parameter 'ratoi' (did you mean 'ratio'?)"),
    "unknown top-level key": ("stepz: {}\n", "unknown key 'stepz'"),
    "malformed yaml": ("steps:\n  a: {step: evaluate\n", "malformed YAML"),
    "bad value": ("steps:\n  a: {step: evaluate, seqlen: long}\n", "seqlen 'long'"),
    "experiment in a step": ("steps:\n  a: {step: evaluate, experiment: x}\n", "set once for the whole pipeline"),
    "ambiguous global": ("params: {method: rtn}\nsteps:\n  q: {step: quantize}\n  f: {step: finetune}\n",
                         "'method' means different things in finetune and quantize"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_pipeline_file_exit_2_before_any_run(case, tmp_path, mlflow_uri, tiny_dirs, capsys, monkeypatch):
    text, needle = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("model: x", f"model: {tiny_dirs['llama']}"))
    LoadCounter(monkeypatch, forbid=True)
    exp = "pipe-bad-" + case.replace(" ", "-")
    assert run_cli(mlflow_uri, exp, path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert runs_of(mlflow_uri, exp) == []


@pytest.mark.parametrize("argv,needle", [
    (["--set", "quant.ratoi=1"], "has no parameter 'ratoi'"),
    (["--set", "nosuch.seqlen=3"], "no step 'nosuch'"),
    (["--set", "colour=red"], "no step of this pipeline has a parameter 'colour'"),
    (["--set", "seqlen"], "expected key=value"),
    (["--rerun", "quantt"], "rerun 'quantt'"),
    (["--set", "quant.group_size=48"], "group_size"),  # the step's own pre-run check (48 ∤ 64)
])
def test_bad_overrides_exit_2_before_any_run(argv, needle, pipe_file, mlflow_uri, capsys, monkeypatch):
    LoadCounter(monkeypatch, forbid=True)
    exp = "pipe-badset-" + "-".join(argv)[:40].replace("=", "-")
    assert run_cli(mlflow_uri, exp, pipe_file, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1], err[-1]
    assert runs_of(mlflow_uri, exp) == []


SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pipeline_loads_and_dry_runs_offline(path, mlflow_uri, tiny_dirs, ppl_text_file, capsys,
                                                     monkeypatch):
    from mlproject.pipeline import spec

    pipe = spec.load(str(path))  # the file as shipped: names, references, order
    header = path.read_text().splitlines()[0]
    assert header.startswith(f"# {path.stem} — ") and "mlproject run" in path.read_text()
    # offline: the tiny model, the bundled tasks, the bundled training data
    overrides = [f"model={tiny_dirs['llama']}", "tasks=mlp_nonce", f"ppl_dataset={ppl_text_file}", "seqlen=32"]
    overrides += [f"{n}.dataset=offline:{s.values.get('method', 'sft')}_mlp_nonce"
                  for n, s in pipe.steps.items() if s.step == "finetune"]
    overrides += [f"{n}.group_size=32" for n, s in pipe.steps.items()
                  if s.step == "quantize" and s.values.get("method", "rtn") in ("rtn", "gptq", "awq", "autoround", "hqq")]
    overrides += [f"{n}.calibration=offline" for n, s in pipe.steps.items()
                  if s.step == "prune" or s.values.get("method") in ("gptq", "awq", "autoround")]
    # the methods this environment cannot run are left out (--skip), with their runs in the comparison
    skip = [n for n, s in pipe.steps.items() if s.step == "quantize" and not method_runs_here(s.values.get("method"))]
    LoadCounter(monkeypatch, forbid=True)
    assert run_cli(mlflow_uri, "pipe-shipped", path, "--dry-run", "--set", " ".join(overrides),
                   *(["--skip", ",".join(skip)] if skip else [])) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} | {s.step} |" in out for name, s in pipe.steps.items() if name not in skip)
    assert not any(f"| {name} |" in out for name in skip)


def method_runs_here(method) -> bool:
    import importlib.util

    import torch

    if method in ("gptq", "awq") and importlib.util.find_spec("llmcompressor") is None:
        return False
    return method != "awq" or torch.cuda.is_available()


def test_the_step_contract_nests_in_process(mlflow_uri, tiny_dirs, ppl_text_file):
    """What the search step builds on: any registered step, called in-process under an open
    run, becomes its child in the parent's experiment (whatever experiment its config names)."""
    import mlflow

    from mlproject import steps, tracking
    from mlproject.config import EvaluateConfig

    mlflow.set_tracking_uri(mlflow_uri)
    cfg = EvaluateConfig(model=str(tiny_dirs["llama"]), tasks="none", ppl_dataset=str(ppl_text_file), seqlen=32,
                         experiment="elsewhere")
    with tracking.step_run("pipeline", experiment="contract", log_env=False) as parent:
        explicit = steps.get("evaluate").run(cfg, parent=parent)
        implicit = steps.get("evaluate").run(cfg)  # the active run is the parent
    client = mlflow_client(mlflow_uri)
    for result in (explicit, implicit):
        run = client.get_run(result.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.experiment_id == parent.experiment_id and run.info.status == "FINISHED"
        assert result.step == "evaluate" and result.model_uri == str(tiny_dirs["llama"])
        assert result.metrics["ppl/sample"] == run.data.metrics["ppl/sample"] and result.key
    assert explicit.key == implicit.key  # same config, same code: same key
    assert client.get_experiment_by_name("elsewhere") is None
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_the_evaluation_engine_needs_no_run(tiny_dirs, ppl_text_file, mlflow_uri, monkeypatch):
    """plan → load → PPL + tasks → metrics with no tracking at all (what search and pipelines reuse)."""
    from mlproject import tracking
    from mlproject.config import EvaluateConfig
    from mlproject.evaluation.options import EvalOptions
    from mlproject.evaluation.engine import evaluate_model
    from mlproject.steps import evaluate

    opts = dict(tasks="mlp_nonce", limit="4", batch_size="4", ppl_dataset=str(ppl_text_file), seqlen=32)
    with monkeypatch.context() as m:
        def no_tracking(*a, **k):
            raise AssertionError("the engine opened a run")

        m.setattr(tracking, "step_run", no_tracking)
        out = evaluate_model(str(tiny_dirs["qwen2"]), EvalOptions(**opts))
    assert {"ppl/sample", "mlp_nonce/acc", "avg_acc", "params_b", "model_size_mb"} <= set(out.metrics)
    logged = evaluate.run(EvaluateConfig(model=str(tiny_dirs["qwen2"]), tracking_uri=mlflow_uri,
                                         experiment="engine", **opts))
    for key in ("ppl/sample", "mlp_nonce/acc", "avg_acc", "params_b"):
        assert out.metrics[key] == pytest.approx(logged.metrics[key], rel=1e-9)


def test_hub_data_is_checked_before_any_step_runs(mlflow_uri, tiny_dirs, tmp_path, capsys, monkeypatch):
    # compress_recover as shipped measures PPL on wikitext2 (a hub data set) from its first step.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    LoadCounter(monkeypatch, forbid=True)
    path = ROOT / "pipelines" / "compress_recover.yaml"
    assert run_cli(mlflow_uri, "pipe-hubdata", path, "--set", f"model={tiny_dirs['llama']} tasks=mlp_nonce") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "step 'base' (evaluate): ppl_dataset 'wikitext2'" in err[-1], err[-1]
    assert "HF_HUB_OFFLINE=1" in err[-1] and "ppl_dataset=offline" in err[-1], err[-1]
    assert runs_of(mlflow_uri, "pipe-hubdata") == []
