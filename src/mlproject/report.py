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


def fmt_metric(name: str, value: Any) -> str:
    """A metric as a person reads it: seconds and MB to 0.1, counts as integers, parameters (B) to
    4 significant digits, PPL to 0.001 (thousands separated when huge), scores to 0.0001."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "N/A" if value in (None, "") else str(value)
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    leaf = name.rsplit("/", 1)[-1]
    if leaf.endswith(("seconds", "_s")) or leaf.endswith("_mb") or leaf.endswith("_gb"):
        return f"{v:,.1f}"
    if leaf.startswith("params_b") or leaf == "params_b":
        return f"{v:.4g}"
    if name.startswith(("ppl/", "nll/", "delta/ppl/")) or leaf in ("effective_bits", "ratio", "achieved_ratio"):
        return f"{v:,.3f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if v.is_integer() and abs(v) >= 1 and not leaf.startswith(("acc", "avg_acc")):
        return f"{int(v):,}"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"


def bullet(items: Mapping[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {'N/A' if v in (None, '') else v}" for k, v in items.items())


def metric_bullets(metrics: Mapping[str, Any]) -> str:
    """System metrics as bullets, each rounded for reading (unrounded values are on the run)."""
    return "\n".join(f"- **{k}**: {fmt_metric(k, v)}" for k, v in metrics.items())


def lm_eval_rows(task_results: Mapping[str, Mapping[str, Any]]) -> list[tuple]:
    """(task, metric, filter, value, stderr) for every numeric metric, stderr beside its value."""
    rows = []
    for task, values in task_results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if key in ("alias", "name", "sample_len") or metric.endswith("_stderr") or isinstance(value, (str, bool)) \
                    or value is None:
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
    ppl_windows_total: int | None = None,
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
    def scored(p) -> str:
        if ppl_windows_total and ppl_windows_total > p.windows:
            return f"{p.windows} of {ppl_windows_total} (the first)"
        return str(p.windows)

    parts.append(md_table(["dataset", "PPL", "NLL", "windows", "tokens", "seqlen"],
                          [(p.dataset, p.ppl, p.nll, scored(p), p.tokens, p.seqlen) for p in ppl])
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
    parts += ["## System metrics", metric_bullets(system or {}), "## Environment",
              bullet({k: v for k, v in (environment or {}).items() if v is not None})]
    return "\n\n".join(parts) + "\n"


def description(title: str, metrics: Mapping[str, Any], *, avg_metrics: Mapping[str, str] | None = None,
                settings: Mapping[str, Any] | None = None, before: Mapping[str, Any] | None = None,
                notes: Iterable[str] = (), report: str | None = "report.md") -> str:
    """The run's description (MLflow's note, shown atop the run page): the headline numbers and
    the settings that make them comparable, in a few lines of Markdown."""
    lines = [f"**{title}**"]
    heads = []
    for key in sorted(k for k in metrics if k.startswith("ppl/")):
        heads.append(f"PPL {key[4:]} **{fmt_metric(key, metrics[key])}**" + _was(key, metrics, before))
    if metrics.get("avg_acc") is not None:
        heads.append(f"avg_acc **{fmt_metric('avg_acc', metrics['avg_acc'])}**" + _was("avg_acc", metrics, before))
    if heads:
        lines.append(" · ".join(heads))
    if avg_metrics:
        by_metric: dict[str, list[str]] = {}
        for task, metric in avg_metrics.items():
            key = f"{task}/{metric}"
            if key in metrics:
                by_metric.setdefault(metric, []).append(f"{task} {fmt_metric(key, metrics[key])}" + _was(key, metrics, before))
        for metric, items in by_metric.items():
            lines.append(f"{metric}: " + " · ".join(items))
    size = []
    for key, label in (("params_b", "B params"), ("model_size_mb", "MB"), ("peak_vram_mb", "MB peak VRAM"),
                       ("peak_rss_mb", "MB peak RSS"), ("train_seconds", "s training"), ("eval_seconds", "s evaluating")):
        if metrics.get(key) is not None:
            size.append(f"{fmt_metric(key, metrics[key])} {label}")
    if size:
        lines.append(" · ".join(size))
    if settings:
        lines.append("Settings: " + " · ".join(f"{k} {v}" for k, v in settings.items() if v not in (None, "")))
    lines.extend(n for n in notes if n)
    if report:
        lines.append(f"Full report: `{report}` (Artifacts tab).")
    return "  \n".join(lines) + "\n"


def _was(key: str, metrics: Mapping[str, Any], before: Mapping[str, Any] | None) -> str:
    if not before or before.get(key) is None or metrics.get(key) is None:
        return ""
    return f" (before {fmt_metric(key, before[key])})"
