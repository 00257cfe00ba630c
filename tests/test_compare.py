"""The comparison report: quality next to cost, per branch, on hand-made metrics."""

import pytest
from kfp.dsl import HTML, Markdown, Metrics

from alignpipe.compare import Branch, compare
from components.compare import compare_report

DPO_EVAL = {
    "gold_reward_policy": 0.10,
    "gold_reward_reference": -0.06,
    "gold_win_rate": 0.60,
    "kl_policy_reference": 2.1,
    "response_tokens_policy_mean": 6.3,
    "response_tokens_reference_mean": 6.5,
}
PPO_EVAL = {
    **DPO_EVAL,
    "gold_reward_policy": 0.25,
    "gold_win_rate": 0.70,
    "kl_policy_reference": 4.0,
}
DPO_TRAIN = {"train_seconds": 11.0, "train_tokens": 120_000.0, "peak_rss_mb": 900.0}
RM_TRAIN = {"train_seconds": 5.0, "train_tokens": 60_000.0, "peak_rss_mb": 700.0}
PPO_TRAIN = {"train_seconds": 40.0, "train_tokens": 90_000.0, "peak_rss_mb": 1100.0}


def test_cost_sums_time_and_tokens_and_takes_the_largest_peak():
    rlhf = Branch("ppo", PPO_EVAL, [RM_TRAIN, PPO_TRAIN])
    assert rlhf.cost() == {"train_seconds": 45.0, "train_tokens": 150_000.0, "peak_rss_mb": 1100.0}
    # a stage that does not count tokens makes the branch's token cost unknown, not smaller
    partial = Branch("ppo", PPO_EVAL, [RM_TRAIN, {"train_seconds": 40.0, "peak_rss_mb": 1.0}])
    assert "train_tokens" not in partial.cost()


def test_metrics_are_prefixed_by_branch_and_the_report_has_both(tmp_path):
    branches = [
        Branch("dpo", DPO_EVAL, [DPO_TRAIN]),
        Branch("ppo", PPO_EVAL, [RM_TRAIN, PPO_TRAIN]),
    ]
    metrics = compare(branches, tmp_path)
    assert metrics["dpo_gold_reward_policy"] == 0.10
    assert metrics["ppo_train_seconds"] == 45.0
    assert metrics["ppo_peak_rss_mb"] == 1100.0
    report = (tmp_path / "comparison.md").read_text()
    assert "| gold reward | -0.060 | 0.100 | 0.250 |" in report
    assert "| training seconds |  | 11.000 | 45.000 |" in report
    assert "| tokens processed |  | 120,000 | 150,000 |" in report
    assert report.startswith("# Alignment methods compared\n\nEvery branch starts from")
    html = (tmp_path / "comparison.html").read_text()
    assert "<tr><td>gold reward</td><td>-0.060</td><td>0.100</td><td>0.250</td></tr>" in html


def test_a_stage_stopped_at_its_kl_bound_is_reported(tmp_path):
    stopped = {**PPO_TRAIN, "iterations": 44.0, "stopped_at_kl_bound": 1.0}
    ran_out = {**PPO_TRAIN, "iterations": 60.0, "stopped_at_kl_bound": 0.0}
    branches = [Branch("dpo", DPO_EVAL, [DPO_TRAIN]), Branch("ppo", PPO_EVAL, [RM_TRAIN, stopped])]
    metrics = compare(branches, tmp_path)
    assert (metrics["ppo_stopped_at_kl_bound"], metrics["ppo_iterations"]) == (1.0, 44.0)
    assert "dpo_stopped_at_kl_bound" not in metrics
    report = (tmp_path / "comparison.md").read_text()
    assert report.endswith(
        "\n- ppo stopped at its KL bound after 44 iterations and kept the last policy within the "
        "bound.\n"
    )
    # a run that used all its iterations adds no note
    compare([branches[0], Branch("ppo", PPO_EVAL, [RM_TRAIN, ran_out])], tmp_path)
    assert "KL bound" not in (tmp_path / "comparison.md").read_text()


def test_one_branch_is_not_a_comparison(tmp_path):
    with pytest.raises(ValueError, match="at least two branches"):
        compare([Branch("dpo", DPO_EVAL, [DPO_TRAIN])], tmp_path)


def test_compare_component_reads_metrics_artifacts(tmp_path):
    def metrics(name, values):
        return Metrics(name=name, uri=str(tmp_path / name), metadata=dict(values))

    report = Markdown(name="report", uri=str(tmp_path / "report.md"), metadata={})
    page = HTML(name="report_html", uri=str(tmp_path / "report.html"), metadata={})
    out = Metrics(name="out", uri=str(tmp_path / "out"), metadata={})
    compare_report.python_func(
        dpo_evaluation=metrics("de", DPO_EVAL),
        ppo_evaluation=metrics("pe", PPO_EVAL),
        dpo_training=metrics("dt", DPO_TRAIN),
        reward_model_training=metrics("rt", RM_TRAIN),
        ppo_training=metrics("pt", PPO_TRAIN),
        report=report,
        report_html=page,
        metrics=out,
    )
    assert out.metadata["ppo_gold_win_rate"] == 0.70
    assert "Alignment methods compared" in (tmp_path / "report.md").read_text()
    assert "<h1>Alignment methods compared</h1>" in (tmp_path / "report.html").read_text()
