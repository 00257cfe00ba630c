"""The ``contrastive`` pipeline end to end under kfp.local, checked through MLflow.

Data prep of part of the STS sample, a tiny model built from its text, contrastive training:
every stage leaves a finished child run, the held-out metrics before and after training reach
the parent run, and the encoder gained on them.
"""

import pytest

from pipelines.__main__ import run_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive-pipeline")
    # the first 800 pairs keep the run short; the file is the sample's own format
    lines = (sample_data / "sts_benchmark/sts-train.csv").read_text().splitlines(keepends=True)
    source = root / "sts.csv"
    source.write_text("".join(lines[:800]))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments = {
        "pair_inputs": [str(source)],
        "tracking_uri": uri,
        "experiment": "contrastive-pipeline",
        "prep_config": {"eval_fraction": 0.25},
        "tiny_options": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64},
        "contrastive_config": {
            "peft": {"method": "none"},
            "max_length": 48,
            "training": {
                "max_steps": 25,
                "batch_size": 32,
                "learning_rate": 3e-3,
                "logging_steps": 5,
                "num_threads": 1,
            },
        },
    }
    run_local("contrastive", arguments, root / "kfp")
    return uri, root


@pytest.fixture(scope="module")
def runs(pipeline_run):
    from mlflow import MlflowClient

    uri, _ = pipeline_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("contrastive-pipeline")
    everything = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in everything if r.data.tags.get("alignpipe.stage") == "pipeline"]
    children = {
        r.data.tags["alignpipe.stage"]: r
        for r in everything
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    return client, parent, children


def test_one_parent_with_a_finished_child_per_stage(runs):
    _, parent, children = runs
    assert parent.info.status == "FINISHED"
    assert set(children) == {"prep", "contrastive"}
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.params, f"{stage} logged no params"
    assert children["contrastive"].data.tags["alignpipe.contrastive_loss"] == "cosent"


def test_the_encoder_gained_on_held_out_pairs_and_the_parent_shows_it(runs):
    client, parent, children = runs
    metrics = parent.data.metrics
    assert metrics["eval_spearman"] > metrics["eval_spearman_initial"] + 0.03
    for key in ("eval_spearman", "eval_accuracy_at_1", "eval_mrr", "eval_mrr_initial"):
        assert metrics[key] == pytest.approx(children["contrastive"].data.metrics[key])
    history = client.get_metric_history(children["contrastive"].info.run_id, "loss")
    steps = sorted(m.step for m in history)
    assert len(steps) >= 3 and steps[0] < steps[-1]


def test_the_encoder_is_saved_as_a_sentence_transformers_folder(pipeline_run):
    _, root = pipeline_run
    [modules] = (root / "kfp").glob("**/contrastive/model/model/modules.json")
    assert any(p.suffix == ".safetensors" for p in modules.parent.iterdir())


def test_the_evaluation_step_shows_both_encoders_side_by_side(runs, pipeline_run):
    _, parent, _ = runs
    _, root = pipeline_run
    [report] = (root / "kfp").glob("*/contrastive-report/report")
    text = report.read_text()
    metrics = parent.data.metrics
    before, after = metrics["eval_spearman_initial"], metrics["eval_spearman"]
    assert "| held-out metric | untrained encoder | trained encoder | change |" in text
    row = f"| Spearman correlation (scored pairs) | {before:.4g} | {after:.4g} |"
    assert row in text
    assert "| retrieval MRR |" in text
