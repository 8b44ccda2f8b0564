"""report.md for a run: the sections of a hand-written quantization run report, filled in."""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping


def md_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "N/A"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bullet(items: Mapping[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {'N/A' if v in (None, '') else v}" for k, v in items.items())


def lm_eval_rows(task_results: Mapping[str, Mapping[str, Any]]) -> list[tuple]:
    """(task, metric, filter, value, stderr) for every numeric metric, stderr beside its value."""
    rows = []
    for task, values in task_results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if key == "alias" or metric.endswith("_stderr") or isinstance(value, (str, bool)) or value is None:
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, filt or "none", float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def render(
    *,
    title: str,
    run_info: Mapping[str, Any],
    datasets: Mapping[str, Any],
    parameters: Mapping[str, Any],
    ppl: Iterable[Any] = (),
    task_results: Mapping[str, Mapping[str, Any]] | None = None,
    avg_acc: float | None = None,
    avg_metrics: Mapping[str, str] | None = None,
    system: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> str:
    parts = [f"# {title}", "## Run info", bullet(run_info), "## Datasets", bullet(datasets),
             "## Parameters", bullet({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                      for k, v in parameters.items()})]
    parts += ["## Perplexity"]
    ppl = list(ppl)
    parts.append(md_table(["dataset", "PPL", "NLL", "windows", "tokens", "seqlen"],
                          [(p.dataset, p.ppl, p.nll, p.windows, p.tokens, p.seqlen) for p in ppl])
                 if ppl else "Not measured.")
    parts += ["## lm-eval results"]
    rows = lm_eval_rows(task_results or {})
    parts.append(md_table(["task", "metric", "filter", "value", "stderr"], rows) if rows else "No tasks run.")
    parts += ["## Mean accuracy"]
    if avg_acc is None:
        parts.append("N/A")
    else:
        used = ", ".join(f"{t}: {m}" for t, m in (avg_metrics or {}).items())
        parts.append(
            f"**avg_acc = {avg_acc:.4f}** — the plain mean over the {len(avg_metrics or {})} requested "
            f"top-level tasks/groups, each counted once (a group by its own aggregate, never its "
            f"subtasks), with acc_norm where reported, else acc, else exact_match/f1 (pass_at_1 for a code task). "
            f"Used: {used}."
        )
    for heading, body in (extra_sections or {}).items():
        parts += [f"## {heading}", body]
    parts += ["## System metrics", bullet(system or {}), "## Environment",
              bullet({k: v for k, v in (environment or {}).items() if v is not None})]
    return "\n\n".join(parts) + "\n"
