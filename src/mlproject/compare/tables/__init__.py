"""The table primitives every compare view builds on: pure pandas, no MLflow, no formatting,
unrounded numbers.

Input is a :class:`~mlproject.compare.query.RunSet` (``runs`` + ``metrics`` frames). Every
function is vectorised over runs (every view for 10,000 runs × 20 metrics: ~1.2 s here,
``benchmarks/compare_compute.py``). The views themselves (summary, versus, ranking …) live in
:mod:`mlproject.compare.views`.

Modules: ``frames`` (pandas helpers, run labels), ``scores`` (each task's headline score, mean
accuracy, ``metrics=`` selection), ``lineage`` (upstream runs, family, root model), ``baseline``
(``baseline=`` resolved to runs and values), ``deltas`` (improved, significant, % change),
``paired`` (flips and paired tests on per-document results), ``code_common`` (code tasks' times on the problems every run solved).

Conventions assumed (see also ``query.py``):

* Task scores: ``<task>/<metric>`` with ``<metric>`` a score (acc, acc_norm, exact_match…,
  f1, pass_at_1 …). The metric a run used for a task is read from its tag
  ``mlproject.avg_acc_metrics`` (JSON ``{"boolq": "acc", "piqa": "acc_norm"}``); without it
  we prefer acc_norm > acc > math_verify > exact_match (flexible-extract before strict-match)
  > f1 > pass@1 … (``directions.SCORE_PREFERENCE``). When any run carries the tag, the task
  list is the union of the tag's keys (so MMLU's 57 subjects do not each become a task).
* Mean accuracy: the logged ``avg_acc``; where absent, the mean of the run's task scores if
  it has a score for every task of the comparison (else N/A: a partial mean misleads).
* "Before" a fine-tune (summary view), per metric, first found of: (1) ``before/<key>`` on
  the run itself, (2) ``<key>`` on its upstream run (tag ``mlproject.upstream_run``),
  (3) ``<key>`` on the latest ``mlproject.step=evaluate`` run that shares the same upstream
  run (an evaluation of the same input model, e.g. of the pruned model before recovery).
  A run that supplies another's "before" is not a summary row itself when its role is
  empty or a step default (``eval``, ``pruned``, ``quantized``: ``views.summary.BEFORE_ROLES``);
  ``base``, ``finetuned``, ``best_acc`` … stay rows.
* Percent changes are computed from unrounded values: (after − before) / before × 100.
* Significance (versus, summary, ranking): where both runs have per-document results for the
  task (``RunSet.documents``), a paired test on the documents both scored (``paired``: exact
  McNemar for 0/1 scores, a paired t-test otherwise; p < 0.05); else a delta is significant when
  |Δ| ≥ 2·sqrt(se_base² + se_cand²), the standard errors being ``<task>/<metric>_stderr``; unknown
  (NA) without both. The ``test`` column says which decided.
"""
