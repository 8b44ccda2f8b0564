"""How every step measures a model and records it: the evaluation engine (``evaluation.engine``,
usable with no run) on a loaded model, its numbers logged on the step's run, the run's
report.md and its description. evaluate measures its input; finetune, quantize and prune
measure their outputs (finetune also its input, with the prefix ``before/``), so every step
measures the same way."""

from __future__ import annotations

from mlproject import tracking
from mlproject.evaluation.engine import EvalOutcome, EvalPlan, measure, scored_datasets
from mlproject.models import loading
from mlproject.report import description, render
from mlproject.tracking import names


def evaluate_loaded(loaded: loading.LoadedModel, plan: EvalPlan, run: tracking.Run, prefix: str = "",
                    step: int = 0) -> EvalOutcome:
    """measure() and log the result on `run`, metric names prefixed (e.g. 'before/'), at `step`
    (finetune logs the trained model's scores at its optimizer step)."""
    out = measure(loaded, plan,
                  lambda metrics: run.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step))
    run.log_params({prefix + k: v for k, v in out.ppl_params.items()})
    run.log_datasets(scored_datasets(plan, out))
    if out.harness is not None:
        run.log_dict(out.harness.raw, f"lm_eval/{prefix.strip('/') or 'results'}{'_results' if prefix else ''}.json")
        import json

        run.set_tags({f"{names.TAG_PREFIX}{prefix.replace('/', '.')}avg_acc_metrics": json.dumps(out.harness.avg_metrics)})
        if out.harness.code is not None:  # per-problem results: compare reads them back
            for task, res in out.harness.code.results.items():
                run.log_dict(res.artifact(plan.code), f"code/{prefix}{task}.json")
            run.set_tags({names.UNSAFE_CODE_TAG: "lm-eval gates opened on purpose ("
                          + "; ".join(f"{k}={v}" for k, v in out.harness.code.gates.items()) + ")"})
    return out


def report(title: str, run: tracking.Run, step: str, params: dict, plan: EvalPlan, out: EvalOutcome,
           system: dict, extra_sections: dict | None = None) -> str:
    import json

    from mlproject import envinfo

    # The snapshot step_run logged as env.json: report and artifact agree, collected once.
    env = run.env or envinfo.collect()
    if out.harness is not None and out.harness.code is not None:
        from mlproject.evaluation.code.lmeval import report_section

        extra_sections = {"Code execution": report_section(out.harness.code, plan.code),
                          **(extra_sections or {})}
    return render(
        title=title,
        run_info={"run id": run.run_id, "step": step, "started": env["time"],
                  "command": f"`{tracking.command_line()}`"},
        datasets={"PPL dataset": plan.opts.ppl_dataset, "PPL windows": plan.ppl_windows_setting,
                  "lm-eval tasks": ", ".join(plan.tasks) or "none",
                  "limit": plan.limit if plan.limit is not None else "all",
                  "calibration": params.get("calibration", "N/A")},
        parameters=params,
        ppl=out.ppl,
        ppl_windows_total=out.ppl_available or None,
        task_results=out.harness.raw.get("results") if out.harness else None,
        avg_acc=out.avg_acc,
        avg_metrics=out.harness.avg_metrics if out.harness else None,
        system=system,
        environment=json.loads(json.dumps(env, default=str)),
        extra_sections=extra_sections,
    )


def describe(run: tracking.Run, title: str, plan: EvalPlan, out: EvalOutcome, metrics: dict, *,
             settings: dict | None = None, before: dict | None = None, notes: tuple = (),
             evaluated: bool = True) -> None:
    """The run's description: headline numbers, then the settings that make them comparable."""
    avg = out.harness.avg_metrics if out.harness else None
    evaluation = plan.settings(out) if evaluated and not plan.empty else {}
    run.set_description(description(title, metrics, avg_metrics=avg, before=before, notes=notes,
                                    settings={**(settings or {}), **evaluation}))
