"""What a search leaves on its study run, recomputed from the Optuna study at the end of every
launch: winners (tags and registry aliases), the trials table, Pareto fronts, parameter
importances, the optimization history, and a report.md.

* ``best_acc`` is the COMPLETE trial with the highest ``avg_acc``, ``best_ppl`` the one with the
  lowest ``ppl/<dataset>`` (ties: the lower trial number) — whichever the trials measured,
  whatever the study optimizes. Pruned trials never win: their numbers are estimates on a
  subset. Its trial run gets ``mlproject.role`` = ``best_acc`` / ``best_ppl`` (``best_acc,best_ppl``
  when one trial wins both; ``mlproject.best_acc`` / ``mlproject.best_ppl`` = ``true`` as exact
  filters either way), a former winner goes back to ``trial``; the trial's model (its target
  step's ``model`` artifact) is registered under the study's name with the alias, the version
  tagged with the study, trial, run and metrics. With ``register_weights`` (the default) a
  winner whose model is a recipe or an adapter is first exported (``models.export``: re-made,
  merged, in the root checkpoint's dtype) and logged once as the MLflow model ``weights`` of that
  run, and *that* is registered: ``models:/<study>@best_acc`` then loads with ``from_pretrained``.
* ``trials.csv`` / ``trials.md``: one row per counted trial (state, parameters, metrics, documents
  scored, run). ``pareto.csv`` / ``pareto.md`` / ``pareto.png``: the non-dominated completed trials
  for avg_acc vs PPL and avg_acc vs model size. ``importances.csv`` / ``importances.md``: Optuna's
  parameter importances per objective. ``history.png``: objective per trial, pruned trials at
  their last estimate, the best so far.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlproject import tracking
from mlproject.report import md_table
from mlproject.search.trials import (ATTR_ERROR, ATTR_LEVEL, ATTR_METRICS, ATTR_MODEL, ATTR_RUN, ATTR_TARGET,
                                     STUDY_WINNERS, counted, tally)
from mlproject.tracking import names

log = logging.getLogger(__name__)

ROLES = ("best_acc", "best_ppl")
#: role → the tag saying "true" / "false" whether a trial holds it (an exact filter beside role)
ROLE_FLAG_TAGS = {"best_acc": names.BEST_ACC_TAG, "best_ppl": names.BEST_PPL_TAG}


@dataclass
class Summary:
    text: str
    metrics: dict[str, float] = field(default_factory=dict)
    winners: dict[str, dict[str, Any]] = field(default_factory=dict)


def trial_rows(study) -> "list[dict[str, Any]]":
    """One dict per counted trial, in trial-number order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not counted(t):
            continue
        metrics = dict(t.user_attrs.get(ATTR_METRICS) or {})
        level = metrics.pop(ATTR_LEVEL, None)
        rows.append({
            "trial": t.number, "state": t.state.name, **{f"param {k}": v for k, v in t.params.items()},
            **metrics, "documents": metrics.get("system/search/documents"),
            "level": level, "run_id": t.user_attrs.get(ATTR_RUN),
            "model_uri": (t.user_attrs.get(ATTR_TARGET) or {}).get(ATTR_MODEL), "error": t.user_attrs.get(ATTR_ERROR),
            "retry_of": (t.system_attrs.get("retry_history") or [None])[-1],  # (failed_trial: a chain's first)
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    return rows


def pick_winners(rows: list[dict[str, Any]], ppl_metric: str | None) -> dict[str, dict[str, Any]]:
    """best_acc: argmax avg_acc, best_ppl: argmin ppl over COMPLETE trials (ties: lower number)."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    out = {}
    acc = [r for r in done if isinstance(r.get("avg_acc"), (int, float))]
    if acc:
        out["best_acc"] = min(acc, key=lambda r: (-r["avg_acc"], r["trial"]))
    if ppl_metric:
        ppl = [r for r in done if isinstance(r.get(ppl_metric), (int, float))]
        if ppl:
            out["best_ppl"] = min(ppl, key=lambda r: (r[ppl_metric], r["trial"]))
    return out


def pareto_front(rows: list[dict[str, Any]], maximize: str, minimize: str) -> list[dict[str, Any]]:
    """COMPLETE trials not dominated in (max ``maximize``, min ``minimize``), by ``minimize``."""
    pts = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r.get(maximize), (int, float))
           and isinstance(r.get(minimize), (int, float))]
    front = [r for r in pts if not any(
        (o[maximize] >= r[maximize] and o[minimize] <= r[minimize])
        and (o[maximize] > r[maximize] or o[minimize] < r[minimize]) for o in pts)]
    return sorted(front, key=lambda r: (r[minimize], -r[maximize]))


def ppl_metric_of(space) -> str | None:
    if any(o.name == "best_ppl" for o in space.objectives):
        return next(o.metric for o in space.objectives if o.name == "best_ppl")
    from mlproject.evaluation.perplexity import check_dataset

    cfg = space.pipe.resolved_values(space.target, _dummy_outputs(space.pipe))
    name = check_dataset(str(cfg.get("ppl_dataset", "offline")))
    return f"ppl/{name}" if name else None


def _dummy_outputs(pipe) -> dict[str, dict[str, str]]:
    from mlproject.pipeline.spec import pending_run_id

    return {n: {"run_id": pending_run_id(n), "model_uri": f"runs:/{pending_run_id(n)}/model"} for n in pipe.steps}


# ----------------------------------------------------------------------------- winners
#: Name of the MLflow model a winner's exported weights are logged as, on its target run.
WEIGHTS = "weights"


def winner_path(uri: str, name: str, register_weights: bool = True) -> str:
    """The path on the winner's run to register: ``weights`` (exported once and logged there) when
    its model (``runs:/<run>/<path>``) is a recipe or an adapter and ``register_weights``, else the
    model's own path. An export that is refused (a non-uniformly pruned model, a digest that no
    longer holds …) is a warning: the model is registered as logged."""
    from mlproject.errors import UserError
    from mlproject.models import export

    model_run, _, path = uri[len("runs:/"):].partition("/")
    path = path or "model"
    if not register_weights:
        return path
    if tracking.logged_model(model_run, WEIGHTS) is not None:  # an earlier launch, or the other role
        return WEIGHTS
    try:
        with tempfile.TemporaryDirectory(prefix="mlproject-weights-") as tmp:
            plan = export.plan(uri, Path(tmp) / WEIGHTS, fetch=tracking.download)
            if not plan.needs_weights:
                return path
            log.info("winner %s of study %s: exporting its %s as real weights (%s)", uri, name, plan.top.kind,
                     plan.dtype)
            done = export.export(plan, fetch=tracking.download, flavor=True)
            run = tracking.Run(model_run, tracking.run_experiment_id(model_run))
            run.log_model_dir(done.out_dir, WEIGHTS, flavor=done.flavor, tags={
                names.STEP_TAG: "export", names.BASE_MODEL_TAG: done.lineage.get("base_model") or "",
                names.FAMILY_TAG: done.lineage.get("family") or "", names.MODEL_UPSTREAM_TAG: uri,
                names.STORE_TAG: "weights", names.STUDY_TAG: name})
    except UserError as exc:
        log.warning("winner %s of study %s is registered as logged, not as weights: %s", uri, name, exc)
        return path
    return WEIGHTS


def apply_winners(study, rows, winners, name: str, space, register_weights: bool = True) -> dict[str, dict[str, Any]]:
    """Tags on the trial runs, aliases in the registry; returns {role: {trial, run_id, version, …}}."""
    roles: dict[str, list[str]] = {}
    for role, row in winners.items():
        roles.setdefault(row["run_id"], []).append(role)
    before = study.user_attrs.get(STUDY_WINNERS) or {}
    for role, old in before.items():
        run_id = old.get("run_id")
        if run_id and run_id not in roles:
            with contextlib.suppress(Exception):
                tracking.set_run_tags(run_id, {names.ROLE_TAG: "trial", ROLE_FLAG_TAGS[role]: "false"})
    for run_id, won in roles.items():
        if run_id:
            tracking.set_run_tags(run_id, {names.ROLE_TAG: ",".join(won),
                                           **{ROLE_FLAG_TAGS[r]: "true" if r in won else "false" for r in ROLES}})
    out = {}
    for role, row in winners.items():
        entry = {"trial": row["trial"], "run_id": row["run_id"], "model_uri": row.get("model_uri")}
        uri = row.get("model_uri") or ""
        if uri.startswith("runs:/"):
            model_run = uri[len("runs:/"):].split("/")[0]
            metrics = {k: v for k, v in row.items() if k == "avg_acc" or k.startswith("ppl/")
                       or k in ("model_size_mb", "params_b")}
            tags = {names.STUDY_TAG: name, names.TRIAL_TAG: row["trial"], names.TRIAL_RUN_TAG: row["run_id"],
                    names.ROLE_TAG: role, **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
                    **{k.replace("param ", "param."): v for k, v in row.items() if k.startswith("param ")}}
            path = winner_path(uri, name, register_weights)
            entry["version"] = tracking.register_alias(name, model_run, role, tags=tags, path=path)
            entry["registered"] = f"models:/{name}@{role}"
            entry["weights"] = path == WEIGHTS
            entry["registered_from"] = f"runs:/{model_run}/{path}"
        out[role] = entry
    study.set_user_attr(STUDY_WINNERS, out)
    return out


# ----------------------------------------------------------------------------- finalize
def finalize(study, space, srun: tracking.Run, name: str, seconds: float = 0.0,
             register_weights: bool = True) -> Summary:
    rows = trial_rows(study)
    ppl = ppl_metric_of(space)
    winners = apply_winners(study, rows, pick_winners(rows, ppl), name, space, register_weights)
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    docs = sum(r["documents"] or 0 for r in rows)
    full = max((r["documents"] or 0 for r in rows if r["state"] == "COMPLETE" and r["documents"]), default=0)
    metrics = {"system/search/trials_complete": counts["COMPLETE"], "system/search/trials_pruned": counts["PRUNED"],
               "system/search/trials_failed": counts["FAIL"], "system/search/documents": docs,
               "system/search/seconds_this_launch": seconds}
    scored = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    if full and scored:
        # what the same trials would have scored with no pruning (every trial at the last level)
        metrics["system/search/documents_fraction"] = docs / (full * len(scored))
    for role, row in pick_winners(rows, ppl).items():
        metric = "avg_acc" if role == "best_acc" else ppl
        metrics[f"{role}/{metric}"] = row[metric]
    srun.log_metrics(metrics)
    param_cols = [k for k in {k: None for r in rows for k in r} if k.startswith("param ")]
    shown = ["trial", "state", *param_cols, "avg_acc", *([ppl] if ppl else []), "model_size_mb", "documents",
             "level", "seconds", "role", "run_id", "error"]
    table = [{**r, "role": ",".join(k for k, w in winners.items() if w["trial"] == r["trial"])} for r in rows]
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="mlproject-search-") as tmp:
        out = Path(tmp)
        _write_table(out, "trials", table, shown)
        fronts = {}
        if ppl:
            fronts["avg_acc vs " + ppl] = pareto_front(rows, "avg_acc", ppl)
        fronts["avg_acc vs model_size_mb"] = pareto_front(rows, "avg_acc", "model_size_mb")
        pareto_rows = [{"front": f, **r} for f, front in fronts.items() for r in front]
        _write_table(out, "pareto", pareto_rows, ["front", "trial", *param_cols, "avg_acc", *([ppl] if ppl else []),
                                                  "model_size_mb", "run_id"])
        importances = _importances(study, space)
        _write_table(out, "importances", importances, ["objective", "parameter", "importance"])
        with contextlib.suppress(Exception):
            _plot_pareto(out / "pareto.png", rows, fronts, ppl, winners)
        with contextlib.suppress(Exception):
            _plot_history(out / "history.png", rows, space, ppl)
        text = _summary_md(name, space, rows, counts, winners, metrics, fronts, importances, ppl, tally(study))
        (out / "report.md").write_text(text)
        srun.log_artifacts(out)
        files = {p.name: str(p) for p in out.iterdir()}
    # the run page's description: the study, the counts and the winners (the tables are artifacts)
    srun.set_description(text.split("\n### Trials", 1)[0].replace(f"## search {name}", f"**search {name}**", 1))
    return Summary(text=text, metrics=metrics, winners={**winners, "_files": sorted(files)})


def _write_table(out: Path, stem: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    cols = [c for c in columns if c in frame.columns]
    frame = frame[cols] if cols else frame
    frame.to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.md").write_text(md_table(cols, frame.itertuples(index=False)) + "\n" if len(frame) else
                                    f"(no {stem})\n")


def _importances(study, space) -> list[dict[str, Any]]:
    import warnings

    import optuna

    out = []
    for i, obj in enumerate(space.objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = (lambda t, i=i: t.values[i]) if len(space.objectives) > 1 else None
                imp = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError, ImportError) as exc:
            log.info("no parameter importances for %s: %s", obj.name, exc)
            continue
        out += [{"objective": obj.name, "parameter": k, "importance": v} for k, v in imp.items()]
    return out


def _plot_pareto(path: Path, rows, fronts, ppl, winners) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, axes = plt.subplots(1, len(fronts), figsize=(6 * len(fronts), 4.5), squeeze=False)
    for ax, (title, front) in zip(axes[0], fronts.items()):
        x_metric = title.split(" vs ", 1)[1]
        pts = [r for r in done if isinstance(r.get(x_metric), (int, float)) and isinstance(r.get("avg_acc"), (int, float))]
        ax.scatter([r[x_metric] for r in pts], [r["avg_acc"] for r in pts], color="0.6", label="completed trials")
        ax.plot([r[x_metric] for r in front], [r["avg_acc"] for r in front], "o-", color="tab:blue",
                label="Pareto front")
        by_trial: dict[int, list[str]] = {}
        for role, w in winners.items():
            by_trial.setdefault(w["trial"], []).append(role)
        for trial, roles in by_trial.items():
            r = next((r for r in pts if r["trial"] == trial), None)
            if r is not None:
                ax.annotate(f"{', '.join(roles)} (trial {trial})", (r[x_metric], r["avg_acc"]),
                            textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"{x_metric} (lower is better)")
        ax.set_ylabel("avg_acc (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(path: Path, rows, space, ppl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    objs = space.objectives
    fig, axes = plt.subplots(1, len(objs), figsize=(6 * len(objs), 4.5), squeeze=False)
    for ax, obj in zip(axes[0], objs):
        metric = obj.metric
        done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r.get(metric), (int, float))]
        pruned = [r for r in rows if r["state"] == "PRUNED" and isinstance(r.get(f"estimate/{metric}"), (int, float))]
        ax.scatter([r["trial"] for r in done], [r[metric] for r in done], color="tab:blue", label="completed")
        ax.scatter([r["trial"] for r in pruned], [r[f"estimate/{metric}"] for r in pruned], marker="x",
                   color="tab:red", label="pruned (estimate when stopped)")
        best, line = None, []
        for r in sorted(done, key=lambda r: r["trial"]):
            v = r[metric]
            best = v if best is None else (max(best, v) if obj.direction == "maximize" else min(best, v))
            line.append((r["trial"], best))
        if line:
            ax.step([a for a, _ in line], [b for _, b in line], where="post", color="tab:green", label="best so far")
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{metric} ({obj.direction})")
        ax.set_title(f"optimization history: {obj.name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_md(name, space, rows, counts, winners, metrics, fronts, importances, ppl, state) -> str:
    lines = [f"## search {name}", ""]
    if space.description:
        lines += [space.description, ""]
    lines.append(f"Space `{space.path}`: pipeline `{space.pipeline}`, each trial runs {', '.join(space.steps)} and "
                 f"scores `{space.target}`'s model; objectives "
                 + ", ".join(f"{o.name} ({o.direction} {o.metric})" for o in space.objectives)
                 + f"; {space.n_trials} trials wanted.")
    lines.append(f"Trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
                 + (f", {state['running']} running, {state['waiting']} waiting" if state["running"] or state["waiting"]
                    else "") + ".")
    if "system/search/documents_fraction" in metrics:
        lines.append(f"Documents scored: {int(metrics['system/search/documents'])} "
                     f"({metrics['system/search/documents_fraction']:.0%} of scoring every scored trial on every document).")
    lines.append("")
    if winners:
        lines.append(md_table(["role", "trial", "run", "registered", "value"], [
            (role, w["trial"], w["run_id"], f"{w.get('registered', '-')} (version {w.get('version', '-')}"
             f"{', weights' if w.get('weights') else ''})",
             next((r.get("avg_acc" if role == "best_acc" else ppl) for r in rows if r["trial"] == w["trial"]), None))
            for role, w in winners.items()]))
    else:
        lines.append("No completed trial yet: no winner.")
    params = [k for k in {k: None for r in rows for k in r} if k.startswith("param ")]
    cols = ["trial", "state", *params, "avg_acc", *([ppl] if ppl else []), "model_size_mb", "documents"]
    lines += ["", "### Trials", "", md_table(cols, [[r.get(c) for c in cols] for r in rows])]
    for title, front in fronts.items():
        if front:
            lines += ["", f"### Pareto front: {title}", "",
                      md_table(["trial", *params, "avg_acc", title.split(' vs ', 1)[1]],
                               [[r["trial"], *[r.get(p) for p in params], r["avg_acc"], r[title.split(' vs ', 1)[1]]]
                                for r in front])]
    if importances:
        lines += ["", "### Parameter importances", "",
                  md_table(["objective", "parameter", "importance"],
                           [(i["objective"], i["parameter"], i["importance"]) for i in importances])]
    return "\n".join(lines) + "\n"
