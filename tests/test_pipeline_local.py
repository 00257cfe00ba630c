"""The ``dpo`` and ``rlhf`` pipelines end to end under kfp.local, checked through MLflow.

One run of each whole graph on the synthetic task with a tiny model trained from scratch: every
stage leaves a child run with params and step metrics under one parent, the parent carries the
evaluation's headline metrics, the aligned policy beats SFT on the gold reward, and the model is
registered.
"""

import copy

import pytest

from alignpipe import synthetic
from alignpipe.demo import COMPARE_ARGUMENTS, DEMO_ARGUMENTS, DEMO_TASK
from pipelines.__main__ import run_local

pytestmark = pytest.mark.slow

# each pipeline's arguments (the demo's), the stages it runs, and those that log a loss
RLHF_ARGUMENTS = {k: v for k, v in DEMO_ARGUMENTS.items() if k != "dpo_config"}
RLHF_ARGUMENTS |= {k: COMPARE_ARGUMENTS[k] for k in ("reward_model_config", "ppo_config")}
PIPELINES = {
    "dpo": (DEMO_ARGUMENTS, {"prep", "ingest", "sft", "dpo", "evaluate"}, ("sft", "dpo")),
    "rlhf": (
        RLHF_ARGUMENTS,
        {"prep", "ingest", "sft", "reward_model", "ppo", "evaluate"},
        ("sft", "reward_model"),
    ),
}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline_run(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"{name}-pipeline")
    task = synthetic.write_task(synthetic.SyntheticTaskOptions(**DEMO_TASK), root / "task")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments = copy.deepcopy(PIPELINES[name][0])
    arguments |= {
        "sft_inputs": [str(task["sft"])],
        "preference_inputs": [str(task["votes"])],
        "tracking_uri": uri,
        "experiment": "pipeline-test",
        "model_name": f"tiny-{name}",
    }
    run_local(name, arguments, root / "kfp")
    return name, uri


@pytest.fixture(scope="module")
def runs(pipeline_run):
    from mlflow import MlflowClient

    name, uri = pipeline_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pipeline-test")
    everything = client.search_runs([experiment.experiment_id])
    parents = [r for r in everything if r.data.tags.get("alignpipe.stage") == "pipeline"]
    assert len(parents) == 1
    [parent] = parents
    children = {
        r.data.tags["alignpipe.stage"]: r
        for r in everything
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    return name, client, parent, children


def test_one_parent_with_a_finished_child_per_stage(runs):
    name, _, parent, children = runs
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["alignpipe.pipeline"] == name
    assert set(children) == PIPELINES[name][1]
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params, f"{stage} logged no params"


def test_training_stages_log_step_metrics(runs):
    name, client, _, children = runs
    for stage in PIPELINES[name][2]:
        history = client.get_metric_history(children[stage].info.run_id, "loss")
        steps = sorted(m.step for m in history)
        assert len(steps) >= 3 and steps[0] < steps[-1], stage
    assert children["sft"].data.params["peft.method"] == "none"
    if name == "rlhf":
        # PPO logs its rollout statistics per iteration
        history = client.get_metric_history(children["ppo"].info.run_id, "kl")
        assert len(history) >= 10


def test_the_aligned_policy_beats_sft_on_the_gold_reward(runs):
    _, _, parent, _ = runs
    metrics = parent.data.metrics
    # measured on the demo's task: DPO -0.061 -> 0.11, PPO -0.061 -> 0.05 to 0.07 by CPU
    assert metrics["gold_reward_policy"] > metrics["gold_reward_reference"] + 0.05
    assert metrics["gold_win_rate"] > 0.5
    assert metrics["passed"] == 1.0


def test_the_model_is_registered_as_candidate(runs):
    name, client, parent, _ = runs
    version = client.get_model_version_by_alias(f"tiny-{name}", "candidate")
    assert version.run_id == parent.info.run_id
    assert version.tags["alignpipe.run_id"] == parent.info.run_id
