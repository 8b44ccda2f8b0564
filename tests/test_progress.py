"""Progress: log lines with an ETA when stderr is not a terminal, an ETA in the rich bar even when
one step takes minutes, and the libraries' own bars (lm-eval, transformers, trl) routed to ours."""

import logging
import re
import time

import pytest

import tiny
from mlproject import progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def log_mode(monkeypatch, caplog):
    def set_interval(seconds: float):
        monkeypatch.setenv("MLPROJECT_PROGRESS", "log")
        monkeypatch.setenv("MLPROJECT_PROGRESS_INTERVAL", str(seconds))
        caplog.set_level(logging.INFO, logger="mlproject.progress")
        return lambda: [r.getMessage() for r in caplog.records if r.name == "mlproject.progress"]

    return set_interval


def test_auto_mode_logs_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("MLPROJECT_PROGRESS", raising=False)
    # pytest captures stderr: not a TTY
    assert progress.mode() == "log"
    monkeypatch.setenv("MLPROJECT_PROGRESS", "off")
    assert progress.mode() == "off"


def test_slow_loop_logs_done_total_and_eta(log_mode):
    lines = log_mode(0.05)
    with progress.progress("slow loop", 4, unit="windows") as advance:
        for _ in range(4):
            time.sleep(0.1)  # each step longer than the interval: every update is due
            advance()
    got = lines()
    assert any(re.search(r"^slow loop: 2/4 windows \(50%\) · 0:\d\d elapsed · ETA 0:\d\d$", line) for line in got), got
    assert got[-1].startswith("slow loop: 4/4 windows (100%) · done in"), got


def test_heartbeat_lines_while_one_step_is_still_running(log_mode):
    lines = log_mode(0.1)
    with progress.progress("long window", 2, unit="windows") as advance:
        time.sleep(0.15)
        advance()
        time.sleep(1.0)  # no update for ten intervals: the ticker thread still reports
    beats = [line for line in lines() if line.startswith("long window: 1/2 windows (50%)") and "ETA" in line]
    assert len(beats) >= 2, lines()


def test_a_phase_of_unknown_length_reports_elapsed_time(log_mode):
    lines = log_mode(0.05)
    with progress.phase("loading big-model") as p:
        time.sleep(0.3)
        p.update(postfix="weights")
    got = lines()
    assert any(re.match(r"loading big-model: 0:00 elapsed$", line) for line in got), got
    assert got[-1] == "loading big-model: done in 0:00 · weights"


def test_quick_tasks_log_nothing(log_mode):
    lines = log_mode(30)
    with progress.progress("instant", 3) as advance:
        advance(3)
    assert lines() == []


def test_eta_shows_when_one_step_takes_longer_than_30_seconds():
    """rich's TimeRemainingColumn estimates speed over the last 30 s only, so with 60-s steps it
    never shows a time; ours uses the task's whole history."""
    from rich.progress import Progress, TimeRemainingColumn

    now = [0.0]
    bar = Progress(get_time=lambda: now[0], auto_refresh=False, disable=True)
    task_id = bar.add_task("perplexity", total=4)
    now[0] = 60.0
    bar.advance(task_id, 1)
    now[0] = 61.0
    task = bar.tasks[0]
    assert str(TimeRemainingColumn().render(task)) == "-:--:--"  # the symptom of issue 11
    assert str(progress.EtaColumn().render(task)) == "ETA 3:03"  # 61 s per window, 3 windows left


def test_rich_bar_draws_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setenv("MLPROJECT_PROGRESS", "rich")
    monkeypatch.setattr(progress, "_CONSOLE", Console(file=out, force_terminal=True, width=120))
    monkeypatch.setattr(progress, "_REPORTER", None)
    with progress.progress("perplexity (offline)", 3, unit="windows") as advance:
        advance(2)
        progress.reporter().progress.refresh()
        drawn = out.getvalue()
    assert "perplexity (offline)" in drawn and "2/3" in drawn and "ETA" in drawn


def test_lm_eval_requests_are_routed(log_mode, capfd):
    from mlproject.evaluation import harness

    lines = log_mode(0)
    harness.run_tasks(tiny.make_model("llama"), tiny.make_tokenizer(), ["mlp_capitals"], limit=4, batch_size=4)
    got = lines()
    assert any(re.match(r"lm-eval: running loglikelihood requests: 16/16 \(100%\)", line) for line in got), got
    assert any(line.startswith("lm-eval: running loglikelihood requests: ") and "ETA" in line for line in got)
    assert "Running loglikelihood requests" not in capfd.readouterr().err  # tqdm drew nothing itself
    # and the modules got their own tqdm back
    import lm_eval.models.huggingface as hf
    from tqdm import tqdm

    assert hf.tqdm is tqdm


def test_model_loading_and_training_report_progress(log_mode, tiny_dirs, tmp_path):
    from mlproject.models import loading
    from mlproject.models.reference import resolve
    from mlproject.training import trainer
    from mlproject.training.config import FinetuneConfig

    lines = log_mode(0)
    loaded = loading.load_model(resolve(str(tiny_dirs["llama"])), device="cpu")
    assert any(line.startswith("loading llama: done in") for line in lines()), lines()
    import datasets

    data = datasets.Dataset.from_list(tiny.SFT_ROWS)
    cfg = FinetuneConfig(output_dir=str(tmp_path), max_steps=3, train_batch_size=2, save_steps=0, logging_steps=1)
    trainer.train(loaded.model, loaded.tokenizer, data, cfg)
    steps = [line for line in lines() if line.startswith("training (sft, lora): ")]
    assert any(re.match(r"training \(sft, lora\): 1/3 steps \(33%\) · .* · ETA ", line) for line in steps), steps
    assert re.match(r"training \(sft, lora\): 3/3 steps \(100%\) · done in .* · loss \d", steps[-1]), steps
