import pytest

from mlproject.errors import UserError
from mlproject.evaluation import harness

RESULTS = {
    "boolq": {"alias": "boolq", "acc,none": 0.8, "acc_stderr,none": 0.01},
    "hellaswag": {"alias": "hellaswag", "acc,none": 0.56, "acc_stderr,none": 0.005,
                  "acc_norm,none": 0.77, "acc_norm_stderr,none": 0.004},
    "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.70, "exact_match_stderr,strict-match": 0.01,
              "exact_match,flexible-extract": 0.71, "exact_match_stderr,flexible-extract": 0.01},
    "mmlu": {"alias": "mmlu", "acc,none": 0.69, "acc_stderr,none": 0.004},
    "mmlu_humanities": {"alias": " - humanities", "acc,none": 0.60, "acc_stderr,none": 0.006},
    "mmlu_formal_logic": {"alias": "  - formal_logic", "acc,none": 0.5, "acc_stderr,none": 0.04},
    "drop": {"alias": "drop", "em,none": 0.1, "f1,none": 0.2},
    "hendrycks_math": {"alias": "math", "exact_match,none": 0.3, "math_verify,none": 0.35},
}


def test_avg_acc_counts_each_top_level_task_once_with_its_preferred_metric():
    top = ["boolq", "hellaswag", "gsm8k", "mmlu"]
    avg, used = harness.mean_accuracy(RESULTS, top)
    # mmlu counts by its group aggregate; its subjects never enter the mean.
    assert avg == pytest.approx((0.8 + 0.77 + 0.71 + 0.69) / 4)
    assert used == {"boolq": "acc", "hellaswag": "acc_norm",
                    "gsm8k": "exact_match.flexible-extract", "mmlu": "acc"}


def test_avg_acc_other_metrics_and_missing_tasks():
    avg, used = harness.mean_accuracy(RESULTS, ["drop", "hendrycks_math", "not_run"])
    assert used == {"drop": "f1", "hendrycks_math": "math_verify"}
    assert avg == pytest.approx((0.2 + 0.35) / 2)
    assert harness.mean_accuracy(RESULTS, []) == (None, {})


def test_flatten_uses_mlflow_legal_names():
    flat = harness.flatten_metrics(RESULTS)
    assert flat["boolq/acc"] == 0.8
    assert flat["boolq/acc_stderr"] == 0.01
    assert flat["gsm8k/exact_match.flexible-extract"] == 0.71
    assert flat["gsm8k/exact_match_stderr.strict-match"] == 0.01
    assert not any("," in k for k in flat)
    assert "boolq/alias" not in flat


def test_suites_expand_in_order_without_duplicates():
    assert harness.expand_tasks("zeroshot7") == ["boolq", "piqa", "hellaswag", "winogrande",
                                                 "arc_easy", "arc_challenge", "openbookqa"]
    assert harness.expand_tasks("quant7,piqa")[-1] == "winogrande"
    from mlproject.evaluation.tasks import OFFLINE_TASKS

    assert harness.expand_tasks("offline") == list(OFFLINE_TASKS)
    assert harness.expand_tasks("none") == []


@pytest.mark.parametrize("value,expected", [("", None), ("0", None), ("50", 50), ("0.2", 0.2), ("1.0", 1.0)])
def test_parse_limit(value, expected):
    assert harness.parse_limit(value) == expected


@pytest.mark.parametrize("value", ["abc", "-1", "2.5", "nan"])
def test_parse_limit_rejects(value):
    with pytest.raises(UserError, match="limit"):
        harness.parse_limit(value)
