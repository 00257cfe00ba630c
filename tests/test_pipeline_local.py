"""The ``dpo`` pipeline end to end under kfp.local, checked through MLflow: the product's promise.

One run of the whole graph on the synthetic task with a tiny model trained from scratch: every
stage leaves a child run with params and step metrics under one parent, the parent carries the
evaluation's headline metrics, DPO beats SFT on the gold reward, and the model is registered.
"""

import copy

import pytest

from alignpipe import synthetic
from alignpipe.demo import DEMO_ARGUMENTS, DEMO_TASK
from pipelines.__main__ import run_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-pipeline")
    task = synthetic.write_task(synthetic.SyntheticTaskOptions(**DEMO_TASK), root / "task")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments = copy.deepcopy(DEMO_ARGUMENTS)
    arguments |= {
        "sft_inputs": [str(task["sft"])],
        "preference_inputs": [str(task["votes"])],
        "tracking_uri": uri,
        "experiment": "pipeline-test",
        "model_name": "tiny-dpo",
    }
    run_local("dpo", arguments, root / "kfp")
    return uri


@pytest.fixture(scope="module")
def runs(pipeline_run):
    from mlflow import MlflowClient

    client = MlflowClient(pipeline_run)
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
    return client, parent, children


def test_one_parent_with_a_finished_child_per_stage(runs):
    _, parent, children = runs
    assert parent.info.status == "FINISHED"
    assert set(children) == {"prep", "ingest", "sft", "dpo", "evaluate"}
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params, f"{stage} logged no params"


def test_training_stages_log_step_metrics(runs):
    client, _, children = runs
    for stage in ("sft", "dpo"):
        history = client.get_metric_history(children[stage].info.run_id, "loss")
        steps = sorted(m.step for m in history)
        assert len(steps) >= 3 and steps[0] < steps[-1], stage
    assert children["sft"].data.params["peft.method"] == "none"


def test_dpo_beats_sft_on_the_gold_reward(runs):
    _, parent, _ = runs
    metrics = parent.data.metrics
    assert metrics["gold_reward_policy"] > metrics["gold_reward_reference"] + 0.05
    assert metrics["gold_win_rate"] > 0.5
    assert metrics["passed"] == 1.0


def test_the_model_is_registered_as_candidate(runs):
    client, parent, _ = runs
    version = client.get_model_version_by_alias("tiny-dpo", "candidate")
    assert version.run_id == parent.info.run_id
    assert version.tags["alignpipe.run_id"] == parent.info.run_id
