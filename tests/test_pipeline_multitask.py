"""The ``multitask`` pipeline end to end under kfp.local, checked through MLflow and its report.

Two sources, each prepped with its own task tag in a ``ParallelFor``, merged, then one tiny
model trained from scratch on the mixture: both tasks' held-out losses fall, they reach the
MLflow parent run, and the report lays them out.
"""

import json
import random
from pathlib import Path

import pytest

from alignpipe import synthetic
from pipelines.__main__ import run_local

pytestmark = pytest.mark.slow

WORDS = [w for _, members in synthetic.CATEGORIES.values() for w in members]
TASKS = ("lists", "reverse")


def reverse_records(count: int) -> list[dict]:
    rng = random.Random(1)
    records = []
    for _ in range(count):
        items = rng.sample(WORDS, rng.randint(2, 4))
        answer = ", ".join(reversed(items)) + "."
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Reverse: {', '.join(items)}."},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return records


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask-pipeline")
    lists = synthetic.generate_sft(synthetic.SyntheticTaskOptions(num_sft=300))
    files = {"lists": root / "lists.jsonl", "reverse": root / "reverse.jsonl"}
    for name, records in (("lists", lists), ("reverse", reverse_records(200))):
        text = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records)
        files[name].write_text(text, encoding="utf-8")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    arguments = {
        "sources": [
            {"inputs": [str(files[t])], "prep_config": {"task": t, "eval_fraction": 0.15}}
            for t in TASKS
        ],
        "tracking_uri": uri,
        "experiment": "multitask-pipeline",
        "tiny_options": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2},
        "multitask_config": {
            "peft": {"method": "none"},
            "max_length": 64,
            "temperature": 2.0,
            "training": {
                "max_steps": 30,
                "learning_rate": 3e-3,
                "batch_size": 16,
                "save_steps": 1000,
                "num_threads": 1,
            },
        },
    }
    run_local("multitask", arguments, root / "kfp")
    return uri, root / "kfp"


@pytest.fixture(scope="module")
def runs(pipeline_run):
    from mlflow import MlflowClient

    uri, _ = pipeline_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("multitask-pipeline")
    everything = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in everything if r.data.tags.get("alignpipe.stage") == "pipeline"]
    children = [
        r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    return parent, children


def test_each_source_is_prepped_and_one_model_trained(runs):
    parent, children = runs
    assert parent.info.status == "FINISHED"
    stages = sorted(r.data.tags["alignpipe.stage"] for r in children)
    assert stages == ["multitask", "prep", "prep"]
    assert {
        r.data.params["task"] for r in children if r.data.tags["alignpipe.stage"] == "prep"
    } == {*TASKS}
    for run in children:
        assert run.info.status == "FINISHED"


def test_both_tasks_improve_and_their_losses_are_on_the_parent_run(runs):
    parent, children = runs
    [trained] = [r for r in children if r.data.tags["alignpipe.stage"] == "multitask"]
    for task in TASKS:
        before, after = (parent.data.metrics[f"eval_loss{s}/{task}"] for s in ("_initial", ""))
        assert after < 0.8 * before, task
        assert trained.data.metrics[f"eval_loss/{task}"] == after
    # temperature 2 over about 255 and 170 train rows: sqrt-proportional, closer than the sizes
    lists, reverse = (parent.data.metrics[f"mixture_weight/{t}"] for t in TASKS)
    assert lists + reverse == pytest.approx(1.0)
    assert 0.5 < lists < 0.6


def test_the_report_shows_every_task_before_and_after(pipeline_run):
    _, kfp_root = pipeline_run
    [report] = Path(kfp_root).glob("*/multitask-report/report")
    text = report.read_text()
    for task in TASKS:
        assert f"| {task} |" in text
    assert "eval loss before" in text
