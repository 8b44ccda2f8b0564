"""compare's vectorised table helpers give what the plain pandas they replace gives, and a
setting one run did not log is never reported as a difference (issue 20: compare 10,000 runs)."""

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

from mlproject.compare import CompareSpec, RunSet, compute
from mlproject.compare import directions as dirs
from mlproject.compare.tables.frames import join_by, lists_by, lookup, map_once, run_labels

SERIES = [
    pd.Series(["boolq/acc", "mbpp/avg_time_s", "boolq/acc", "ppl/wiki", "avg_acc"]),
    pd.Series(["boolq/acc", None, "boolq/acc", "ppl/wiki", None], index=list("vwxyz"), name="key"),
    pd.Series(np.array(["boolq/acc", None, "x/f1"], dtype=object), dtype=object),
    pd.Series([None, None], dtype=object),
    pd.Series([], dtype="str"),
]
FUNCS = [dirs.leaf, dirs.Directions({"f1": "min"}), dirs.is_time_like, len, lambda k: None,
         lambda k: k if len(k) > 8 else None]


@pytest.mark.parametrize("s", SERIES)
@pytest.mark.parametrize("fn", FUNCS)
def test_map_once_is_the_dict_map(s, fn):
    want = s.map({k: fn(k) for k in s.dropna().unique()})
    pdt.assert_series_equal(map_once(s, fn), want, check_exact=True)  # values, dtype, index


def test_lookup_reads_each_rows_cell():
    m = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [4.0, np.nan, 6.0]},
                     index=pd.Index(["r1", "r2", "r3"], dtype=object))
    keys = pd.Series(["a", "b", None, "zz", "b", "a"])
    runs = np.array(["r3", "r1", "r2", "r2", None, "q"], dtype=object)
    np.testing.assert_array_equal(lookup(m, keys, runs), [3.0, 4.0, np.nan, np.nan, np.nan, np.nan])
    np.testing.assert_array_equal(lookup(m, pd.Series(["b", "b"]), pd.Index(["r2", "r3"])), [np.nan, 6.0])


def test_lists_and_joins_per_group_keep_row_order():
    df = pd.DataFrame({"a": ["x", "y", "x", None, "z", "y"], "b": ["1", "1", "2", "1", None, "1"],
                       "v": list("pqrstu")})
    assert lists_by(df, "a", "v").to_dict() == {"x": ["p", "r"], "y": ["q", "u"], "z": ["t"]}
    assert lists_by(df, ["a", "b"], "v").to_dict() == {("x", "1"): ["p"], ("y", "1"): ["q", "u"],
                                                       ("x", "2"): ["r"]}
    joined = join_by(np.array([2, 0, 2, 2, 0]), 4, np.array(list("abcde"), dtype=object))
    assert joined.tolist() == ["b, e", "", "a, c, d", ""]


def test_run_labels_are_unique_and_show_unfinished_runs():
    runs = pd.DataFrame({"run_name": ["a", "a", "", None, "b"],
                         "status": ["FINISHED", "RUNNING", None, "", "FAILED"]},
                        index=pd.Index(["0123456789ab", "abcdef012345", "ffffffff0000", "eeee1111x",
                                        "12"], dtype=object))
    assert run_labels(runs).tolist() == ["a (012345)", "a (abcdef) [RUNNING]", "ffffffff",
                                         "eeee1111", "b [FAILED]"]


def _record(i, limit):
    params = {} if limit is None else {"limit": limit}
    return {"run_id": f"{i:032x}", "run_name": f"run-{i}", "start_time": i, "params": params,
            "metrics": {"avg_acc": 0.5 + i / 100, "ppl/wiki": 10.0 - i}, "tags": {"mlproject.step": "evaluate"}}


def test_a_setting_one_run_did_not_log_is_not_a_difference():
    # two runs scored on 20 documents, one that logged no limit, one on 50
    result = compute(RunSet.from_records([_record(1, "20"), _record(2, "20"), _record(3, None),
                                          _record(4, "50")]), CompareSpec(view="ranking"))
    assert result.setting_flags == {f"{4:032x}": "limit 50 (vs 20)"}
    table = result.tables["settings"].set_index("run_id")
    assert pd.isna(table.loc[f"{3:032x}", "limit"]) and table.loc[f"{3:032x}", "differs"] == ""
    # against a baseline run that logged none, nothing is known to differ
    result = compute(RunSet.from_records([_record(1, None), _record(2, "20")]),
                     CompareSpec(view="versus", baseline="name:run-1"))
    assert result.setting_flags == {}
