"""The compare view registry: a view is one module plus one line in ``VIEWS``.

The ``count`` view below (runs per model family: one table, one Markdown block) is registered for
these tests only, by ``monkeypatch.setitem(VIEWS, "count", "<module>:COUNT_VIEW")`` — the line
that shipping it would add to ``mlproject/compare/views/__init__.py`` — and then goes end to end
through spec validation, ``compute``, Markdown, HTML and every output file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mlproject.compare import CompareSpec, RunSet, compute, views
from mlproject.compare.render.blocks import Heading, Table, cell
from mlproject.compare.tables.lineage import families
from mlproject.compare.views import VIEWS, View
from mlproject.errors import UserError

COMPARE = Path(__file__).resolve().parent.parent / "src" / "mlproject" / "compare"


# ----------------------------------------------------------------------------- the count view
# (what src/mlproject/compare/views/count.py would hold)

def count_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Number of compared runs per model family."""
    scope = runs.index[runs["in_scope"].astype(bool)]
    fam = families(runs).reindex(scope).fillna("(none)")
    return fam.value_counts().sort_index().rename_axis("family").reset_index(name="runs")


def count_blocks(result, max_rows: int) -> list:
    t = result.tables.get("count")
    if t is None:
        return []
    rows = [[cell(r.family), cell(r.runs)] for r in t.head(max_rows).itertuples()]
    return [Heading(2, "Runs per family"), Table(["Family", "Runs"], rows, ["l", "r"])]


COUNT_VIEW = View("count", compute=lambda inp: {"count": count_table(inp.runs)}, blocks=count_blocks)


# ----------------------------------------------------------------------------- tests

@pytest.fixture
def count_view(monkeypatch):
    monkeypatch.setitem(VIEWS, "count", f"{__name__}:COUNT_VIEW")


def _runset() -> RunSet:
    def rec(i, family=None, in_scope=True):
        tags = {"mlproject.family": family} if family else {}
        return {"run_id": f"{i:032x}", "run_name": f"r{i}", "start_time": 1000 + i, "in_scope": in_scope,
                "tags": tags, "metrics": {"t/acc": 0.1 * i}}

    # r4 is a lineage run (fetched as a "before" source, not compared): not counted
    return RunSet.from_records([rec(1, "Llama"), rec(2, "Qwen"), rec(3, "Llama"), rec(4, "Llama", False),
                                rec(5)])


def test_a_registered_view_goes_end_to_end(count_view, tmp_path):
    spec = CompareSpec.from_params(view="count")
    assert spec.view == ("count",)
    res = compute(_runset(), spec)
    assert res.tables["count"].to_dict("records") == [
        {"family": "(none)", "runs": 1}, {"family": "Llama", "runs": 2}, {"family": "Qwen", "runs": 1}]
    assert set(res.tables) == {"count", "pareto", "settings"}  # no other view ran; the shared parts did
    md = res.markdown()
    assert "## Runs per family\n\n| Family | Runs |\n|:---|---:|\n| (none) | 1 |\n| Llama | 2 |\n| Qwen | 1 |\n" in md
    assert "<h2>Runs per family</h2>" in res.html()
    names = {p.name for p in res.write(tmp_path, ["md", "csv", "json", "html"])}
    assert {"count.csv", "compare.md", "compare.html", "compare.json"} <= names
    assert pd.read_csv(tmp_path / "count.csv")["runs"].sum() == 4
    assert json.loads((tmp_path / "compare.json").read_text())["tables"]["count"][1] == {"family": "Llama", "runs": 2}


def test_view_all_takes_every_registered_view_in_registry_order(count_view):
    assert CompareSpec().view == ("summary", "versus", "ranking", "count")
    res = compute(_runset(), CompareSpec(baseline="r1"))
    assert "count" in res.tables and "versus" in res.tables
    md = res.markdown()
    assert md.index("## Ranking") < md.index("## Runs per family")


def test_an_unknown_view_is_refused_listing_the_registry(monkeypatch):
    with pytest.raises(UserError) as e:
        CompareSpec(view="count")
    assert str(e.value) == "unknown view 'count': choose from summary, versus, ranking, all"
    monkeypatch.setitem(VIEWS, "count", f"{__name__}:COUNT_VIEW")
    with pytest.raises(UserError, match="choose from summary, versus, ranking, count, all$"):
        CompareSpec(view="ranking,nope")
    with pytest.raises(UserError, match="unknown view 'nope'"):
        views.get("nope")


def test_each_registry_entry_resolves_to_its_view():
    for name in VIEWS:
        assert views.get(name).name == name


def test_spec_reads_the_registry_without_importing_a_view():
    code = ("import sys; from mlproject.compare import CompareSpec; CompareSpec(view='versus,ranking'); "
            "heavy = [m for m in sys.modules if m in ('pandas', 'matplotlib', 'mlflow') "
            "or m.startswith(('mlproject.compare.views.', 'mlproject.compare.tables'))]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_view_name_outside_its_own_module():
    """core and document loop over the registry: no view is special-cased by name there."""
    for module in ("core.py", "document.py"):
        text = (COMPARE / module).read_text(encoding="utf-8")
        for name in ("summary", "versus", "ranking"):
            assert f'"{name}' not in text and f"'{name}" not in text, (module, name)
