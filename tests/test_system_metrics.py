"""MLflow's system metrics on step runs (tracking.system_metrics), against a real `mlflow server`.

A step run samples the machine every MLPROJECT_SYSTEM_METRICS seconds into MLflow's ``system/``
series (the run page's System metrics tab), beside our per-step peak memory; the sampler stops
with the run whatever ends it, logs nothing when switched off, and never fails a step.
"""

from __future__ import annotations

import logging
import threading

import pytest

from conftest import mlflow_client
from mlproject import tracking
from mlproject.config import EvaluateConfig
from mlproject.steps import evaluate
from mlproject.tracking import system_metrics
from mlproject.tracking.system_metrics import SAMPLED_METRICS, SYSTEM_METRICS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CPU, MEMORY, MEMORY_PCT = SAMPLED_METRICS


def samplers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mlproject-system-metrics")]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(uri).get_metric_history(run_id, key))


def run_eval(uri, model_dir, ppl_file, experiment):
    cfg = EvaluateConfig(model=str(model_dir), tasks="mlp_capitals", limit="4", batch_size="8",
                         ppl_dataset=str(ppl_file), seqlen=32, experiment=experiment, tracking_uri=uri)
    return evaluate.run(cfg)


@pytest.fixture
def uri(mlflow_uri):
    """The session's server, as this process's tracking URI (step_run logs there)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    return mlflow_uri


def test_an_evaluate_run_fills_the_system_metrics_tab(uri, tiny_dirs, ppl_text_file, monkeypatch):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.5")
    result = run_eval(uri, tiny_dirs["llama"], ppl_text_file, "sysm-evaluate")
    assert samplers() == []  # stopped with the run
    run = mlflow_client(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    cpu, memory = history(uri, result.run_id, CPU), history(uri, result.run_id, MEMORY)
    assert len(cpu) >= 1 and len(memory) == len(cpu)
    # one metric step per sample, counted from 0 (the last one taken when the run ended)
    assert [s for s, _ in cpu] == list(range(len(cpu)))
    assert all(0 <= v <= 100 for _, v in cpu)
    assert all(v > 0 for _, v in memory)  # the machine's used memory, in MB
    assert 0 < run.data.metrics[MEMORY_PCT] <= 100
    # our per-step figures are still there, beside MLflow's sampled series
    assert run.data.metrics["peak_rss_mb"] > 50 and "ppl/sample" in run.data.metrics


def test_off_logs_no_system_metrics_and_starts_no_thread(uri, monkeypatch):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "off")
    with tracking.step_run("evaluate", experiment="sysm-off", log_env=False) as run:
        assert samplers() == []
        run.log_metrics({"avg_acc": 0.5})
    got = mlflow_client(uri).get_run(run.run_id).data.metrics
    assert got == {"avg_acc": 0.5}


def test_a_failing_step_still_stops_the_sampler(uri, tiny_dirs, ppl_text_file, monkeypatch):
    from mlproject.evaluation import harness

    def boom(*a, **k):
        assert len(samplers()) == 1  # sampling while the step works
        raise RuntimeError("harness exploded on purpose")

    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.5")
    monkeypatch.setattr(harness, "run_tasks", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_eval(uri, tiny_dirs["llama"], ppl_text_file, "sysm-failure")
    assert samplers() == []
    client = mlflow_client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("sysm-failure").experiment_id])
    assert run.info.status == "FAILED"
    assert len(history(uri, run.info.run_id, CPU)) >= 1  # the last sample made it too
    # Ctrl-C: KILLED, and the sampler gone as well
    with pytest.raises(KeyboardInterrupt):
        with tracking.step_run("prune", experiment="sysm-failure", log_env=False) as killed:
            raise KeyboardInterrupt
    assert samplers() == []
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert len(history(uri, killed.run_id, CPU)) >= 1


@pytest.mark.parametrize("step", ["pipeline", "search", "compare"])
def test_runs_that_do_no_heavy_work_are_not_sampled(step, uri, monkeypatch):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.1")
    with tracking.step_run(step, experiment="sysm-others", log_env=False) as run:
        assert samplers() == []
    assert not any(k in SAMPLED_METRICS for k in mlflow_client(uri).get_run(run.run_id).data.metrics)


def test_mlflows_own_switch_adds_no_second_sampler_to_a_step_run(uri, monkeypatch):
    """MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true: MLflow would start its own monitor in start_run;
    a step run has ours only (each metric step logged once), a pipeline parent keeps MLflow's."""
    from mlflow.tracking import fluent

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.1")
    with tracking.step_run("pipeline", experiment="sysm-mlflow-switch", log_env=False) as parent:
        assert parent.run_id in fluent.run_id_to_system_metrics_monitor  # MLflow's, as MLflow documents
        with tracking.step_run("quantize", log_env=False) as child:
            assert child.run_id not in fluent.run_id_to_system_metrics_monitor
            assert len(samplers()) == 1
    steps = [s for s, _ in history(uri, child.run_id, CPU)]
    assert steps == list(range(len(steps))) and steps


def test_a_reopened_run_continues_its_metric_steps(uri, monkeypatch):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.1")
    with tracking.step_run("finetune", experiment="sysm-resume", log_env=False) as first:
        pass
    before = len(history(uri, first.run_id, CPU))
    with tracking.step_run("finetune", run_id=first.run_id, log_env=False):
        pass
    steps = [s for s, _ in history(uri, first.run_id, CPU)]
    assert steps == list(range(len(steps))) and len(steps) > before


def test_under_torchrun_only_rank_0_samples(uri, tmp_path):
    """Two ranks, one run: rank 0 samples the machine, rank 1 (a NullRun) starts no sampler."""
    import os
    import subprocess
    import sys
    import textwrap

    from conftest import subprocess_env

    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import os, threading
        from mlproject import tracking
        with tracking.step_run("evaluate", experiment="sysm-ranks", log_env=False) as run:
            n = sum(t.name.startswith("mlproject-system-metrics") for t in threading.enumerate())
            print(f"rank {os.environ['RANK']} samplers {n} run {run.run_id}", flush=True)
    """))
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLPROJECT_SYSTEM_METRICS="0.2", OMP_NUM_THREADS="1")
    out = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script)], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(script))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(" run ")[0] for line in lines] == ["rank 0 samplers 1", "rank 1 samplers 0"]
    run_id = lines[0].split(" run ")[1]
    assert lines[1].endswith(run_id)  # one run for the launch
    steps = [s for s, _ in history(uri, run_id, CPU)]
    assert steps == list(range(len(steps))) and steps  # one sampler's points, each step once


def test_a_server_that_does_not_answer_costs_a_warning_only(monkeypatch, caplog):
    from mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sampler = system_metrics.SystemMetrics("0" * 32, f"http://127.0.0.1:{free_port()}", 0.1)
    with caplog.at_level(logging.WARNING, logger="mlproject.tracking.system_metrics"):
        sampler.start()
        sampler.stop()
    assert not sampler.is_alive()
    assert sampler.samples >= 1 and sampler.sent == 0
    assert any("sending failed" in r.getMessage() for r in caplog.records)


def test_gpu_series_come_from_nvml_when_it_is_there(uri, monkeypatch):
    """The wiring of the GPU series: MLflow's GPUMonitor on a stand-in NVML module (this machine
    has neither a GPU nor pynvml; on a GPU machine it is nvidia-ml-py's). A reading the device
    does not support (power on a MIG slice) is warned about once, not at every sample."""
    import sys
    import types

    from mlflow.system_metrics.metrics import gpu_monitor

    class NVMLError(Exception):
        pass

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3e9, total=8e9),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42),
        nvmlDeviceGetPowerUsage=lambda h: (_ for _ in ()).throw(NVMLError("Not Supported")))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu_monitor, "pynvml", nvml, raising=False)
    monkeypatch.setenv(SYSTEM_METRICS_ENV, "0.1")
    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = records.append
    gpu_log = logging.getLogger("mlflow.system_metrics.metrics.gpu_monitor")  # mlflow's loggers do not propagate
    gpu_log.addHandler(catcher)
    try:
        with tracking.step_run("evaluate", experiment="sysm-gpu", log_env=False) as run:
            [sampler] = samplers()
            for _ in range(2000):  # a few samples, each failing the power reading inside MLflow
                if sampler.samples >= 3:
                    break
                threading.Event().wait(0.05)
    finally:
        gpu_log.removeHandler(catcher)
    util = history(uri, run.run_id, "system/gpu_0_utilization_percentage")
    assert len(util) >= 3 and {v for _, v in util} == {42.0}
    assert history(uri, run.run_id, "system/gpu_0_memory_usage_megabytes")[0][1] == 3000.0
    assert len([r for r in records if "power usage" in r.getMessage()]) == 1


@pytest.mark.parametrize("raw,seconds", [("", 10.0), ("2.5", 2.5), ("0", None), ("off", None), ("OFF", None),
                                         ("0.01", system_metrics.MIN_SECONDS), ("soon", 10.0)])
def test_the_setting(raw, seconds, monkeypatch):
    monkeypatch.setenv(SYSTEM_METRICS_ENV, raw)
    assert system_metrics.sampling_seconds() == seconds
