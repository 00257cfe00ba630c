"""The ``compare`` pipeline end to end under kfp.local: DPO and RLHF from one SFT model.

The demo's own settings: the synthetic task, a tiny model trained from scratch, then DPO on one
branch and a reward model + PPO on the other, both evaluated against the SFT model and compared.
"""

import copy

import pytest

from alignpipe import synthetic
from alignpipe.demo import COMPARE_ARGUMENTS, DEMO_ARGUMENTS, DEMO_TASK
from pipelines.__main__ import run_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("compare-pipeline")
    task = synthetic.write_task(synthetic.SyntheticTaskOptions(**DEMO_TASK), root / "task")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments = copy.deepcopy({**DEMO_ARGUMENTS, **COMPARE_ARGUMENTS})
    arguments |= {
        "sft_inputs": [str(task["sft"])],
        "preference_inputs": [str(task["votes"])],
        "tracking_uri": uri,
        "experiment": "compare-test",
    }
    run_local("compare", arguments, root / "kfp")

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("compare-test")
    everything = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in everything if r.data.tags.get("alignpipe.stage") == "pipeline"]
    children = [
        r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    return parent, children, root


def test_both_branches_ran_under_one_parent(runs):
    parent, children, _ = runs
    assert parent.info.status == "FINISHED"
    stages = sorted(r.data.tags["alignpipe.stage"] for r in children)
    assert stages == sorted(
        ["prep", "ingest", "sft", "dpo", "reward_model", "ppo", "evaluate", "evaluate"]
    )
    assert all(r.info.status == "FINISHED" for r in children)


def test_the_comparison_reaches_the_parent_and_the_report(runs):
    parent, _, root = runs
    metrics = parent.data.metrics
    for branch in ("dpo", "ppo"):
        for key in ("gold_reward_policy", "gold_win_rate", "kl_policy_reference", "peak_rss_mb"):
            assert f"{branch}_{key}" in metrics, f"{branch}_{key}"
    # both branches were measured against the same SFT answers
    assert metrics["dpo_gold_reward_reference"] == metrics["ppo_gold_reward_reference"]
    [report] = root.glob("kfp/*/compare-report/report")
    assert "| gold reward |" in report.read_text()


def test_both_policies_are_scored_by_the_reward_model_too(runs):
    parent, _, root = runs
    metrics = parent.data.metrics
    # the same SFT answers, scored once for both branches
    sft = metrics["dpo_reward_model_reward_reference"]
    assert sft == metrics["ppo_reward_model_reward_reference"]
    # PPO optimised this very score
    assert metrics["ppo_reward_model_reward_policy"] > sft
    [report] = root.glob("kfp/*/compare-report/report")
    assert "| reward_model reward |" in report.read_text()


def test_both_methods_beat_sft_and_ppo_stays_within_its_kl_bound(runs):
    parent, children, _ = runs
    metrics = parent.data.metrics
    sft = metrics["dpo_gold_reward_reference"]
    assert metrics["dpo_gold_reward_policy"] > sft
    assert metrics["ppo_gold_reward_policy"] > sft
    [ppo] = [r for r in children if r.data.tags["alignpipe.stage"] == "ppo"]
    assert ppo.data.metrics["reward"] > ppo.data.metrics["reward_initial"]  # the RM's score
    assert (
        ppo.data.metrics["kl_to_reference"] < COMPARE_ARGUMENTS["ppo_config"]["max_kl_to_reference"]
    )


def test_the_report_says_whether_ppo_ended_at_its_kl_bound(runs):
    # on some CPUs the demo's PPO reaches the bound before its last iteration, on others not;
    # either way the comparison on the parent run and in the report says which
    parent, children, root = runs
    [ppo] = [r for r in children if r.data.tags["alignpipe.stage"] == "ppo"]
    [report] = root.glob("kfp/*/compare-report/report")
    stopped = ppo.data.metrics["stopped_at_kl_bound"] == 1.0
    iterations = ppo.data.metrics["iterations"]
    assert stopped == (ppo.data.tags.get("alignpipe.stopped") == "max_kl_to_reference"), (
        ppo.data.tags
    )
    if stopped:
        assert parent.data.metrics["ppo_stopped_at_kl_bound"] == 1.0
        assert parent.data.metrics["ppo_iterations"] == iterations
        assert f"ppo stopped at its KL bound after {iterations:.0f} iterations" in (
            report.read_text()
        )
    else:
        assert iterations == COMPARE_ARGUMENTS["ppo_config"]["training"]["max_steps"]
        assert "ppo_stopped_at_kl_bound" not in parent.data.metrics
        assert "KL bound" not in report.read_text()
