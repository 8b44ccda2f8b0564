"""Code tasks' run times on the problems every compared run solved.

A code task's logged ``avg_time_s`` / ``time_ratio`` average over the problems that run solved,
so a model solving only the easy problems would look fast. Here they are recomputed per run over
the problems *every* in-scope run with that task solved and timed (from the per-problem
artifacts ``code/<task>.json``); the ``code_common`` table and the notes say what was done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs

#: Time metrics of code tasks recomputed on the problems every compared run solved.
COMMON_TIME_METRICS = {"avg_time_s": "time_s", "time_ratio": "time_ratio"}


@dataclass
class CommonSet:
    """For one code task: the problems every compared run solved (and timed)."""

    task: str
    runs: list[str]
    problems: list[str]
    total: int            # distinct problems seen across the runs
    missing: list[str]    # runs without per-problem results (then: no common set)

    @property
    def applied(self) -> bool:
        return not self.missing


def common_problem_metrics(runs: pd.DataFrame, metrics: pd.DataFrame,
                           problems: pd.DataFrame | None) -> tuple[pd.DataFrame, dict[str, CommonSet]]:
    """Code tasks' ``avg_time_s`` / ``time_ratio`` recomputed per run over the problems that
    *every* in-scope run with that task solved and timed, so a model solving only the easy
    problems cannot win on speed. ``avg_time_s`` = mean seconds, ``time_ratio`` = geometric
    mean of candidate / reference, as the evaluation defines them. Where a run lacks its
    per-problem results, that task keeps the logged values (and says so)."""
    if problems is None:
        return metrics, {}
    out = metrics.copy()
    info: dict[str, CommonSet] = {}
    scope = runs.index[runs["in_scope"].astype(bool)]
    tasks = sorted({c.rsplit("/", 1)[0] for c in metrics.columns if c.endswith("/timed")
                    and not dirs.is_reserved(c)})
    for task in tasks:
        members = [r for r in scope if pd.notna(metrics.at[r, f"{task}/timed"])]
        if not members:
            continue
        pt = problems[(problems["task"] == task) & problems["run_id"].isin(members)]
        have = set(pt["run_id"])
        missing = [r for r in members if r not in have]
        timed = pt[pt["time_s"].notna()]
        counts = timed.groupby("problem")["run_id"].nunique()
        common = sorted(counts.index[counts == len(members)]) if not missing else []
        info[task] = CommonSet(task, members, common, int(pt["problem"].nunique()), missing)
        if missing:
            continue
        sel = timed[timed["problem"].isin(common)]
        for metric, col in COMMON_TIME_METRICS.items():
            key = f"{task}/{metric}"
            if key not in out:
                continue
            if metric == "time_ratio":  # ratios multiply: geometric mean
                vals = np.log(sel[col].where(sel[col] > 0)).groupby(sel["run_id"]).mean()
                vals = np.exp(vals)
            else:
                vals = sel.groupby("run_id")[col].mean()
            out.loc[members, key] = vals.reindex(members).to_numpy(dtype="float64")
    return out, info


def common_notes(common: dict[str, CommonSet], explain: bool) -> list[str]:
    """One note per code task whose times could not be put on common problems; with ``explain``
    (a view shows the times without saying so) also one per task where they were."""
    notes = []
    for task, cs in common.items():
        if cs.missing:
            notes.append(f"{task}: no per-problem results (artifact code/{task}.json) for "
                         f"{len(cs.missing)} of {len(cs.runs)} runs, so avg_time_s and "
                         "time_ratio are each run's own average over the problems it solved, "
                         "not a like-for-like comparison")
        elif not cs.problems:
            notes.append(f"{task}: no problem was solved by all {len(cs.runs)} runs; run "
                         "times cannot be compared (N/A)")
        elif explain:
            notes.append(f"{task}: avg_time_s and time_ratio are over the {len(cs.problems)} "
                         f"problems all {len(cs.runs)} compared runs solved, in every view")
    return notes


def common_table(common: dict[str, CommonSet]) -> pd.DataFrame:
    """The ``code_common`` table: per code task, the problems every compared run solved."""
    return pd.DataFrame(
        [{"task": c.task, "runs": len(c.runs), "common_problems": len(c.problems),
          "problems_seen": c.total, "applied": c.applied, "missing_runs": c.missing,
          "problems": c.problems} for c in common.values()])
