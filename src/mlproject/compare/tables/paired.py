"""Two runs scored on the same documents are paired data: flips and the paired test.

A compressed model can keep its mean accuracy while changing many individual answers. With the
per-document results every evaluation logs (artifact ``eval/documents.parquet``, read by
``query.fetch_documents`` into ``RunSet.documents``), a baseline run and a candidate run are
compared document by document, for the metric key compare shows for a task (``boolq/acc``:
group ``boolq``, metric ``acc``):

* documents pair on (leaf task, ``doc_id``) and only when their ``doc_hash`` agrees (a changed
  data set, or another document order, never pairs silently); the key's group is matched
  against the documents' ``group`` (``mmlu`` → all its subjects) or, for a key logged per
  subject (``mmlu_anatomy/acc``), against their leaf ``task``; metric names match loosely
  (``directions.canon``: ``exact_match.flexible-extract`` ~ ``exact_match_flexible-extract``);
* binary metrics (every paired value 0 or 1): both right, both wrong, correct → wrong
  (baseline 1, candidate 0), wrong → correct, their rates over the pairs, and the exact
  two-sided McNemar test on the discordant pairs — ``scipy.stats.binomtest(min(b, c), b + c,
  0.5)``, which for p = ½ is ``min(1, 2·F(min(b, c)))`` with F the Binomial(b + c, ½) CDF
  (computed that way, vectorised, with ``scipy.special.bdtr``; p = 1 when b + c = 0);
* other scores (F1, BLEU …): the paired t-test on the per-document differences (what
  ``scipy.stats.ttest_rel`` computes: t = mean / (sd / √n) from each pair's mean and variance of
  the differences, p from Student's t with n − 1 degrees of freedom, ``scipy.special.stdtr``).
  ``scipy.special`` rather than ``scipy.stats``: the same functions, a fifth of the import time.
  Why t and not Wilcoxon: the Δ compare shows is the change of the *mean* score, which is what
  the t-test is about (Wilcoxon's signed ranks test a location shift of the differences, and
  drop or specially treat the many zero differences bounded per-document scores have); with
  the hundreds of documents a task has the mean difference is close to normal; and it needs
  only grouped moments, so every (candidate, task) pair is tested in one pass. No difference
  at all → p = 1; fewer than two pairs → p unknown.

``RunSet.documents`` has the columns ``query.DOCUMENT_COLUMNS``. Its strings are factorized once
per frame (the views of one compare share it), then everything is integer merges and one
groupby over the document rows: O(rows), whatever the number of (candidate, task) pairs.
"""

from __future__ import annotations

import weakref

import numpy as np
import pandas as pd

from mlproject.compare import directions as dirs
from mlproject.compare.tables.frames import map_once

#: significance level of the paired tests
ALPHA = 0.05
MCNEMAR = "McNemar (exact)"
PAIRED_T = "paired t"
#: the fallback: |Δ| ≥ 2·√(se₁² + se₂²) from the logged standard errors (``deltas.significant``)
STDERR = "stderr"
#: what ``paired_tests`` returns per (candidate, baseline, key) row
PAIRED_COLUMNS = ["n_pairs", "both_right", "both_wrong", "correct_to_wrong", "wrong_to_correct",
                  "correct_to_wrong_rate", "wrong_to_correct_rate", "flip_rate", "p_value", "test"]
_COUNTS = ["both_right", "both_wrong", "correct_to_wrong", "wrong_to_correct"]


def no_pairs(index) -> pd.DataFrame:
    """The result for rows with no paired documents: n_pairs 0, everything else unknown."""
    n = len(index)
    cols: dict[str, object] = {"n_pairs": np.zeros(n, dtype="int64")}
    for c in _COUNTS:
        cols[c] = pd.arrays.IntegerArray(np.zeros(n, dtype="int64"), np.ones(n, dtype=bool))
    for c in ("correct_to_wrong_rate", "wrong_to_correct_rate", "flip_rate", "p_value"):
        cols[c] = np.full(n, np.nan)
    cols["test"] = np.full(n, None, dtype=object)
    return pd.DataFrame(cols, index=index)[PAIRED_COLUMNS]


#: the last documents frame coded and its codes: the views of one compare (versus, summary,
#: ranking) pair the same ``RunSet.documents``, which is never modified once fetched
_LAST: dict = {"ref": None, "coded": None}


def _coded(documents: pd.DataFrame) -> tuple[pd.DataFrame, pd.Index, pd.Index, pd.Index]:
    """``_code(documents)``, remembered for the last frame (held weakly: it goes with it)."""
    ref = _LAST["ref"]
    if ref is None or ref() is not documents:
        coded = _code(documents)

        def forget(_, cache=_LAST):
            cache["ref"] = cache["coded"] = None

        _LAST["ref"], _LAST["coded"] = weakref.ref(documents, forget), coded
    return _LAST["coded"]


def _code(documents: pd.DataFrame) -> tuple[pd.DataFrame, pd.Index, pd.Index, pd.Index]:
    """The document rows as integers (strings factorized once: every join below is on integer
    keys), and the names behind the codes: (rows, runs, scopes, metrics).

    Each row is there under every name a metric key's group may use for it — its group and,
    for a subtask of a group, also its own task name (``scope``); ``slice`` numbers the
    (run, scope, metric) a row belongs to, ``doc`` its (task, doc_id), ``hash`` its doc_hash."""
    d = documents
    value = d["value"].to_numpy(dtype="float64")
    keep = ~np.isnan(value)
    d, value = d[keep], value[keep]
    if not len(d):
        empty = pd.DataFrame({c: np.zeros(0, dtype="int64") for c in ("slice", "doc", "hash")})
        return empty.assign(value=np.zeros(0)), pd.Index([]), pd.Index([]), pd.Index([])
    run_c, runs = pd.factorize(d["run_id"])
    task_c, tasks = pd.factorize(d["task"])
    group_c, groups = pd.factorize(d["group"])
    metric_c, metric_names = pd.factorize(d["metric"])
    hash_c, _ = pd.factorize(d["doc_hash"])
    # the loose metric name (exact_match.flexible-extract ~ exact_match_flexible-extract)
    canon_c, metrics = pd.factorize(pd.Index([dirs.canon(str(m)) for m in metric_names]))
    scopes = pd.Index(pd.unique(np.concatenate([np.asarray(groups, dtype=object),
                                                np.asarray(tasks, dtype=object)])))
    task_scope = scopes.get_indexer(tasks)[task_c]
    group_scope = scopes.get_indexer(groups)[group_c]
    doc_id = d["doc_id"].to_numpy(dtype="int64")
    rows = pd.DataFrame({"run": run_c.astype("int64"), "scope": group_scope.astype("int64"),
                         "m": canon_c[metric_c].astype("int64"),
                         "doc": task_c.astype("int64") * (int(doc_id.max()) + 1) + doc_id,
                         "hash": hash_c.astype("int64"), "value": value})
    rows = rows.drop_duplicates(["run", "doc", "m"])
    pos = rows.index.to_numpy()
    sub = (task_scope != group_scope)[pos]
    if sub.any():
        rows = pd.concat([rows, rows[sub].assign(scope=task_scope[pos][sub])], ignore_index=True)
    rows["slice"] = (rows["run"] * len(scopes) + rows["scope"]) * len(metrics) + rows["m"]
    return rows[["slice", "doc", "hash", "value"]], pd.Index(runs), scopes, pd.Index(metrics)


def paired_tests(documents: pd.DataFrame | None, pairs: pd.DataFrame) -> pd.DataFrame:
    """Flips and the paired test per row of ``pairs`` (columns ``candidate_id``, ``baseline_id``,
    ``key``; any index): a frame of ``PAIRED_COLUMNS`` with the same index. Rows without paired
    documents (either run has none for the key, no hash agrees, the candidate is the baseline)
    get ``n_pairs`` 0 and NA; non-binary metrics get NA counts and rates."""
    out = no_pairs(pairs.index)
    if documents is None or not len(documents) or not len(pairs):
        return out
    cand_ids = pairs["candidate_id"].to_numpy(dtype=object)
    base_ids = pairs["baseline_id"].to_numpy(dtype=object)
    keys = pd.Series(pairs["key"].to_numpy(dtype=object))
    ok = pd.notna(cand_ids) & pd.notna(base_ids) & keys.notna().to_numpy() & (cand_ids != base_ids)
    if not ok.any():
        return out
    docs, runs, scopes, metrics = _coded(documents)
    if docs.empty:
        return out
    scope = scopes.get_indexer(map_once(keys, dirs.group).to_numpy(dtype=object))
    m = metrics.get_indexer(map_once(keys, lambda k: dirs.canon(dirs.leaf(k))).to_numpy(dtype=object))
    c_run, b_run = runs.get_indexer(cand_ids), runs.get_indexer(base_ids)
    ok &= (scope >= 0) & (m >= 0) & (c_run >= 0) & (b_run >= 0)
    pair = np.flatnonzero(ok)

    span = int(docs["doc"].max()) + 1

    def side(run_codes) -> pd.DataFrame:
        """The documents of each pair's run on one side, keyed by (pair, document) as one int."""
        sl = (run_codes[pair] * len(scopes) + scope[pair]) * len(metrics) + m[pair]
        s = pd.DataFrame({"pair": pair, "slice": sl}).merge(docs, on="slice")
        return pd.DataFrame({"at": s["pair"].to_numpy() * span + s["doc"].to_numpy(),
                             "hash": s["hash"].to_numpy(), "value": s["value"].to_numpy()})

    j = side(c_run).merge(side(b_run), on="at", suffixes=("_c", "_b"))
    j = j[j["hash_c"].to_numpy() == j["hash_b"].to_numpy()]  # the same document text only
    if j.empty:
        return out
    j["pair"] = j["at"].to_numpy() // span
    from scipy import special  # here: a compare without paired documents never imports it

    b, c = j["value_b"].to_numpy(dtype="float64"), j["value_c"].to_numpy(dtype="float64")
    g = pd.DataFrame({
        "pair": j["pair"].to_numpy(), "both_right": (b == 1) & (c == 1),
        "both_wrong": (b == 0) & (c == 0), "correct_to_wrong": (b == 1) & (c == 0),
        "wrong_to_correct": (b == 0) & (c == 1), "d": c - b, "nz": c != b,
    }).groupby("pair", sort=False)
    a = g[_COUNTS + ["nz"]].sum()
    a["n"] = g.size()
    a["mean"] = g["d"].mean()
    a["var"] = g["d"].var(ddof=1)
    n = a["n"].to_numpy(dtype="float64")
    binary = a[_COUNTS].sum(axis=1).to_numpy() == a["n"].to_numpy()
    # exact McNemar: two-sided binomial test of min(b, c) of b + c discordant pairs, p = 1/2
    rw, wr = a["correct_to_wrong"].to_numpy(), a["wrong_to_correct"].to_numpy()
    disc = rw + wr
    p_mc = np.where(disc > 0, np.minimum(1.0, 2.0 * special.bdtr(np.minimum(rw, wr), disc, 0.5)),
                    1.0)
    # paired t on the differences (ttest_rel): t = mean / (sd / √n), n − 1 degrees of freedom
    with np.errstate(divide="ignore", invalid="ignore"):
        t = a["mean"].to_numpy() / np.sqrt(a["var"].to_numpy() / n)
        p_t = 2.0 * special.stdtr(n - 1, -np.abs(t))
    p_t = np.where(a["nz"].to_numpy() == 0, 1.0, np.where(n >= 2, p_t, np.nan))

    # back to the rows of ``pairs`` (positions: its index may repeat)
    pos = a.index.to_numpy()
    size = len(pairs)
    cols: dict[str, object] = {}
    n_pairs = np.zeros(size, dtype="int64")
    n_pairs[pos] = a["n"].to_numpy()
    cols["n_pairs"] = n_pairs
    known = np.zeros(size, dtype=bool)
    known[pos] = binary
    for col in _COUNTS:
        vals = np.zeros(size, dtype="int64")
        vals[pos] = a[col].to_numpy()
        cols[col] = pd.arrays.IntegerArray(vals, ~known)

    def spread(values) -> np.ndarray:
        arr = np.full(size, np.nan)
        arr[pos] = values
        return arr

    with np.errstate(divide="ignore", invalid="ignore"):
        cols["correct_to_wrong_rate"] = spread(np.where(binary, rw / n, np.nan))
        cols["wrong_to_correct_rate"] = spread(np.where(binary, wr / n, np.nan))
        cols["flip_rate"] = spread(np.where(binary, disc / n, np.nan))
    cols["p_value"] = spread(np.where(binary, p_mc, p_t))
    test = np.full(size, None, dtype=object)
    test[pos] = np.where(binary, MCNEMAR, PAIRED_T)
    cols["test"] = test
    return pd.DataFrame(cols, index=pairs.index)[PAIRED_COLUMNS]
