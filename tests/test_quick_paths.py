"""A `limit` run is quick all through: with ppl_windows=-1 (auto) the PPL follows the limit, and the
run says what was scored (issue 11, item 5)."""

import pytest

from conftest import mlflow_client
from mlproject.evaluation.options import EvalOptions
from mlproject.errors import UserError
from mlproject.evaluation.engine import plan_eval


@pytest.mark.parametrize("limit,ppl_windows,expected,shown", [
    ("", -1, 41, "auto (all)"),          # no limit: the whole text
    ("20", -1, 20, "auto (limit 20)"),    # limit=N documents -> the first N windows
    ("0.25", -1, 11, "auto (limit 0.25)"),  # a fraction -> ceil(0.25 * 41)
    ("500", -1, 41, "auto (limit 500)"),  # never more than the text has
    ("20", 0, 41, "all"),                 # 0: every window, whatever the limit
    ("20", 5, 5, 5),                      # an explicit cap wins
    ("", 50, 41, 50),
])
def test_windows_scored(limit, ppl_windows, expected, shown):
    plan = plan_eval(EvalOptions(tasks="none", limit=limit, ppl_windows=ppl_windows))
    assert plan.windows(41) == expected
    assert plan.params()["ppl_windows"] == shown


def test_ppl_windows_below_minus_one_is_refused():
    with pytest.raises(UserError, match="ppl_windows -2"):
        EvalOptions(ppl_windows=-2)


def test_a_limit_run_scores_as_many_windows_and_logs_it(mlflow_uri, tiny_dirs, ppl_text_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlproject.config import EvaluateConfig
    from mlproject.steps import evaluate
    from test_perplexity import hand_ppl

    cfg = EvaluateConfig(model=str(tiny_dirs["llama"]), tasks="mlp_nonce", limit="2", batch_size="4",
                         ppl_dataset=str(ppl_text_file), seqlen=16, experiment="quick-paths", tracking_uri=mlflow_uri)
    result = evaluate.run(cfg)
    run = mlflow_client(mlflow_uri).get_run(result.run_id)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    ids = tok(ppl_text_file.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    p = run.data.params
    assert p["ppl_windows"] == "auto (limit 2)" and p["ppl.windows"] == "2"
    assert int(p["ppl.windows_total"]) == ids.numel() // 16 > 2
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    assert run.data.metrics["ppl/sample"] == pytest.approx(hand_ppl(model, ids[:32], 16), rel=1e-5)
    md = open(mlflow_client(mlflow_uri).download_artifacts(result.run_id, "report.md", str(tmp_path))).read()
    assert f"| 2 of {ids.numel() // 16} (the first) |" in md and "**PPL windows**: auto (limit 2)" in md
