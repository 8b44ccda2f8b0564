"""Multi-fidelity scoring: a model scored on nested random document subsets, level by level.

Evaluating a 7B model on lm-eval suites is what a search pays for, so each trial first scores a
small random subset of every task's documents (and of the PPL windows), then larger subsets
that contain the earlier ones, and a pruner may stop a poor trial between levels.

* The subsets are a seeded shuffle of each task's documents (``random.Random(f"{seed}:{task}")``),
  the same for every trial, so two trials at one level are scored on the same documents. Not
  lm-eval's ``limit``, which takes the *first* documents (a biased prefix when a dataset is
  ordered): documents are picked explicitly with ``simple_evaluate(samples={task: [ids]})``.
* Level ``k`` covers the first ``ceil(f_k · n)`` documents of the shuffle (``f`` the level
  fractions, the last 1.0). Only the documents new at a level are scored there; per-document
  results are kept, so a trial that reaches the last level has scored each document once and
  its scores equal a single full evaluation of the same documents.
* ``limit`` (a count, or a fraction) caps the documents of a task as in the evaluate step, but
  takes a random sample of that size rather than the first ones.
* A task's score is the mean of its per-document values of the metric ``avg_acc`` uses
  (``acc_norm`` where reported, else ``acc`` …; harness.preferred_metric), so only tasks whose
  metric aggregates by a mean can be scored in levels (checked up front). A group counts once:
  the document-weighted mean of its subtasks (lm-eval's ``weight_by_size``), or the mean of its
  subtasks' means when the group says so. ``avg_acc`` is the mean over the requested tasks.
* Perplexity: the windows the evaluate step would score (the first ``plan.windows()``:
  ``ppl_windows``, or with -1 as many as ``limit`` says), shuffled the same way; PPL =
  exp(total NLL / total tokens) over the windows scored so far, equal to the evaluate step's
  PPL at the last level.

Nothing here talks to MLflow or Optuna; the search reports the levels.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from mlproject.errors import UserError
from mlproject.evaluation import harness


@dataclass
class TaskDocs:
    """One requested task or group (it counts once in avg_acc) and the documents considered."""

    name: str
    leaves: dict[str, int]  # leaf task -> documents considered (after limit)
    total: dict[str, int]  # leaf task -> documents the task has
    metric: dict[str, tuple[str, str]]  # leaf task -> (per-document metric, filter) scored
    group: bool = False
    weight_by_size: bool = True  # group aggregate: document-weighted (lm-eval's default) or mean of subtasks


def _preferred(task) -> tuple[str, str]:
    """(metric, filter) a leaf task contributes to avg_acc, from its config: the same rule as
    harness.preferred_metric applies to results."""
    aggregation = task.aggregation()
    filters = [f.get("name", "none") if isinstance(f, dict) else getattr(f, "name", "none")
               for f in (getattr(task.config, "filter_list", None) or [])] or ["none"]
    fake = {f"{m},{f}": 0.0 for m in aggregation for f in filters}
    key = harness.preferred_metric(fake)
    if key is None:
        raise UserError(f"task {task.task_name!r} reports no accuracy-like metric "
                        f"({', '.join(aggregation) or 'none'}); it cannot be scored by the search")
    metric, filt = harness.split_key(key)
    fn = aggregation[metric]
    if getattr(fn, "__name__", "") != "mean":
        raise UserError(f"task {task.task_name!r}: its metric {metric!r} aggregates by "
                        f"{getattr(fn, '__name__', fn)!r}, not a mean of per-document values, so it cannot be "
                        "scored on document subsets; leave it out of the search's tasks")
    return metric, filt


def _cap(n: int, limit: int | float | None) -> int:
    if limit is None:
        return n
    if isinstance(limit, float):
        return min(n, max(1, math.ceil(n * limit)))
    return min(n, int(limit))


def task_documents(tasks: list[str], limit: int | float | None = None) -> list[TaskDocs]:
    """Load the tasks (their documents) once and describe what the levels draw from."""
    tm = harness.task_manager_for(tasks)
    out: list[TaskDocs] = []
    for name in tasks:
        loaded = tm.load([name])
        leaves = loaded["tasks"]
        group = loaded["groups"].get(name)
        weight = True
        if group is not None:
            aggs = getattr(group.config, "aggregate_metric_list", None) or []
            first = aggs[0] if aggs else None
            if first is not None:
                weight = bool(first.get("weight_by_size", True) if isinstance(first, dict)
                              else getattr(first, "weight_by_size", True))
        total = {leaf: len(task.eval_docs) for leaf, task in leaves.items()}
        out.append(TaskDocs(name=name, leaves={leaf: _cap(n, limit) for leaf, n in total.items()}, total=total,
                            metric={leaf: _preferred(task) for leaf, task in leaves.items()},
                            group=group is not None, weight_by_size=weight))
    return out


def shuffled(n: int, seed: int, label: str) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{label}").shuffle(order)
    return order


def level_counts(n: int, fractions: list[float]) -> list[int]:
    """Cumulative documents per level: ceil(f·n), at least 1 when n > 0, non-decreasing."""
    counts, last = [], 0
    for f in fractions:
        c = min(n, max(last, math.ceil(f * n), 1 if n else 0))
        counts.append(c)
        last = c
    return counts


@dataclass
class Level:
    """What is known after one level (cumulative), and what this level added."""

    level: int  # 1-based
    fraction: float
    documents: int  # documents scored so far (all tasks)
    windows: int  # PPL windows scored so far
    metrics: dict[str, float]  # avg_acc, <task>/<metric>(_stderr), ppl/<ds>, nll/<ds> over everything so far
    # per-instance values added at this level, for instance-wise pruners (Wilcoxon):
    # accuracy: (instance id, value) with mean over all instances == avg_acc; PPL: (window index, window NLL)
    acc_instances: list[tuple[int, float]] = field(default_factory=list)
    ppl_instances: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    last: bool = False


class LevelScorer:
    """Scores one loaded model level by level (see the module docstring)."""

    def __init__(self, loaded, plan, docs: list[TaskDocs], fractions: list[float], seed: int):
        self.loaded, self.plan, self.docs, self.fractions, self.seed = loaded, plan, docs, fractions, seed
        self.scores: dict[str, dict[int, float]] = {leaf: {} for td in docs for leaf in td.leaves}
        self.order = {leaf: shuffled(td.total[leaf], seed, leaf)[:td.leaves[leaf]] for td in docs for leaf in td.leaves}
        self.counts = {leaf: level_counts(len(o), fractions) for leaf, o in self.order.items()}
        self.weight = self._instance_weights()
        offset, self.offset = 0, {}
        for td in docs:
            for leaf in sorted(td.leaves):
                self.offset[leaf] = offset
                offset += td.total[leaf]
        self.nll_sum, self.tokens, self.windows_done = 0.0, 0, 0
        self.windows = None
        self.window_order: list[int] = []
        self.window_counts: list[int] = []

    # -- the documents ---------------------------------------------------------------
    def _instance_weights(self) -> dict[str, float]:
        """Per-document weight × number of instances: the plain mean over all instances of
        weight·score is avg_acc (what Wilcoxon's paired test compares)."""
        n_all = sum(n for td in self.docs for n in td.leaves.values())
        t = len([td for td in self.docs if sum(td.leaves.values())])
        out = {}
        for td in self.docs:
            leaves = {k: n for k, n in td.leaves.items() if n}
            for leaf, n in leaves.items():
                share = (1 / sum(leaves.values())) if (td.group and td.weight_by_size) else 1 / (len(leaves) * n)
                out[leaf] = n_all * share / max(t, 1)
        return out

    def _task_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        tops = []
        for td in self.docs:
            per_leaf = {leaf: list(self.scores[leaf].values()) for leaf in td.leaves if self.scores[leaf]}
            if not per_leaf:
                continue
            if td.group and td.weight_by_size:
                values = [v for vs in per_leaf.values() for v in vs]
                score = sum(values) / len(values)
            else:
                score = sum(sum(vs) / len(vs) for vs in per_leaf.values()) / len(per_leaf)
            for leaf, vs in per_leaf.items():
                metric, filt = td.metric[leaf]
                name = harness.metric_name(leaf, f"{metric},{filt}")
                mean = sum(vs) / len(vs)
                out[name] = mean
                if len(vs) > 1:
                    var = sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)
                    out[name.replace(f"/{metric}", f"/{metric}_stderr", 1)] = math.sqrt(var / len(vs))
            if td.group:
                metric, filt = next(iter(td.metric.values()))
                out[harness.metric_name(td.name, f"{metric},{filt}")] = score
            tops.append(score)
        if tops:
            out["avg_acc"] = sum(tops) / len(tops)
        return out

    # -- PPL windows -----------------------------------------------------------------
    def _prepare_windows(self) -> None:
        from mlproject.evaluation import perplexity

        opts = self.plan.opts
        text = perplexity.load_text(opts.ppl_dataset)
        ids = self.loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        ctx = perplexity.context_length(self.loaded.model) or opts.seqlen
        seqlen = min(opts.seqlen, ctx, ids.numel())
        windows = perplexity.make_windows(ids, seqlen)
        windows = windows[:self.plan.windows(windows.size(0))]  # the (first) windows the evaluate step scores
        self.windows = windows
        self.window_order = shuffled(windows.size(0), self.seed, f"ppl:{self.plan.ppl_name}")
        self.window_counts = level_counts(windows.size(0), self.fractions)

    def _score_windows(self, index: list[int]) -> list[tuple[int, float]]:
        import torch
        import torch.nn.functional as F

        model = self.loaded.model
        device = next(model.parameters()).device
        out = []
        bs = max(1, self.plan.opts.ppl_batch_size)
        for start in range(0, len(index), bs):
            chunk = index[start:start + bs]
            batch = self.windows[chunk].to(device)
            with torch.inference_mode():
                logits = model(input_ids=batch).logits[:, :-1, :].float()
            target = batch[:, 1:]
            # per window (each window's NLL is an instance for the paired pruner), same sums as
            # perplexity.window_nll
            nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(dim=1)
            for w, value in zip(chunk, nll.tolist()):
                self.nll_sum += value
                self.tokens += target.size(1)
                out.append((w, value / target.size(1)))
        return out

    # -- levels ----------------------------------------------------------------------
    def levels(self, start: int = 0) -> Iterator[Level]:
        """Yield the state after each level; the caller stops iterating to stop scoring."""
        import torch

        torch.manual_seed(self.plan.opts.seed)
        if self.plan.ppl_name and self.windows is None:
            self._prepare_windows()
        for k in range(start, len(self.fractions)):
            t0 = time.perf_counter()
            samples = {}
            for leaf, order in self.order.items():
                lo = self.counts[leaf][k - 1] if k else 0
                new = order[lo:self.counts[leaf][k]]
                if new:
                    samples[leaf] = new
            acc_instances: list[tuple[int, float]] = []
            if samples:
                hr = harness.run_tasks(self.loaded.model, self.loaded.tokenizer, list(samples), samples=samples,
                                       log_samples=True, num_fewshot=self.plan.num_fewshot,
                                       batch_size=self.plan.batch_size, seed=self.plan.opts.seed)
                metric_of = {leaf: td.metric[leaf] for td in self.docs for leaf in td.leaves}
                for leaf, rows in (hr.samples or {}).items():
                    metric, filt = metric_of[leaf]
                    for row in rows:
                        if row.get("filter", "none") != filt or metric not in row:
                            continue
                        self.scores[leaf][row["doc_id"]] = row[metric]
                        acc_instances.append((self.offset[leaf] + row["doc_id"], self.weight[leaf] * row[metric]))
                missing = {leaf for leaf, ids in samples.items() if not set(ids) <= set(self.scores[leaf])}
                if missing:
                    raise RuntimeError(f"lm-eval returned no per-document {metric_of[sorted(missing)[0]][0]} for "
                                       f"some documents of {sorted(missing)[0]}")
            ppl_instances: list[tuple[int, float]] = []
            if self.windows is not None:
                lo = self.window_counts[k - 1] if k else 0
                ppl_instances = self._score_windows(self.window_order[lo:self.window_counts[k]])
                self.windows_done = self.window_counts[k]
            metrics = self._task_metrics()
            if self.tokens:
                mean = self.nll_sum / self.tokens
                metrics[f"ppl/{self.plan.ppl_name}"] = math.exp(mean)
                metrics[f"nll/{self.plan.ppl_name}"] = mean
            yield Level(level=k + 1, fraction=self.fractions[k],
                        documents=sum(len(s) for s in self.scores.values()), windows=self.windows_done,
                        metrics=metrics, acc_instances=acc_instances, ppl_instances=ppl_instances,
                        seconds=time.perf_counter() - t0, last=k == len(self.fractions) - 1)

    @property
    def full_documents(self) -> int:
        return sum(len(o) for o in self.order.values())


def full_cost(docs: list[TaskDocs]) -> int:
    """Documents a trial scores when it reaches the last level."""
    return sum(n for td in docs for n in td.leaves.values())


def check_fractions(levels: Any) -> list[float]:
    """Level fractions: increasing, in (0, 1], the last 1.0."""
    if isinstance(levels, (int, float)):
        levels = [levels]
    if not isinstance(levels, list) or not levels:
        raise UserError(f"fidelity levels {levels!r}: give a list of increasing fractions ending at 1.0, e.g. "
                        "[0.1, 0.3, 1.0]")
    try:
        out = [float(v) for v in levels]
    except (TypeError, ValueError):
        raise UserError(f"fidelity levels {levels!r}: every level is a fraction in (0, 1]") from None
    if any(not (0 < v <= 1) for v in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise UserError(f"fidelity levels {levels!r}: fractions must increase strictly within (0, 1]")
    if out[-1] != 1.0:
        raise UserError(f"fidelity levels {levels!r}: the last level must be 1.0 (every document)")
    return out
