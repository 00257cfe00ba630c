"""The multitask stage on two small tasks: the mixture, per-task eval loss, and MLflow.

Task ``lists`` is the synthetic task's demonstrations ("Name three fruits." -> "apple, pear,
plum."); task ``reverse`` is generated here ("Reverse: apple, pear, plum." -> "plum, pear,
apple."). Each is prepped on its own with its task tag, as the multitask pipeline does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from alignpipe import multitask, prep, sft, synthetic
from alignpipe.cli import main
from alignpipe.config import load_config
from alignpipe.errors import ConfigError, DataError
from alignpipe.runner import run_stage

WORDS = [w for _, members in synthetic.CATEGORIES.values() for w in members]
TRAINING = {
    "peft": {"method": "none"},
    "max_length": 64,
    "training": {
        "max_steps": 30,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "logging_steps": 10,
        "save_steps": 1000,
        "num_threads": 1,
        "precision": "fp32",
    },
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reverse_task(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        items = rng.sample(WORDS, rng.randint(2, 4))
        prompt = f"Reverse: {', '.join(items)}."
        answer = ", ".join(reversed(items)) + "."
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two prep output folders, one per task (about 270 + 180 train conversations)."""
    root = tmp_path_factory.mktemp("multitask-data")
    lists = [
        {"messages": r["messages"]}
        for r in synthetic.generate_sft(synthetic.SyntheticTaskOptions(num_sft=300))
    ]
    files = {
        "lists": write_jsonl(root / "lists.jsonl", lists),
        "reverse": write_jsonl(root / "reverse.jsonl", reverse_task(200)),
    }
    folders = {}
    for task, path in files.items():
        folders[task] = str(root / f"{task}-prep")
        prep.run(prep.PrepConfig(task=task, eval_fraction=0.15), [str(path)], folders[task])
    return folders


def make_config(model, **values) -> multitask.MultitaskStageConfig:
    return load_config(multitask.MultitaskStageConfig, None, {**TRAINING, "model": model, **values})


@pytest.mark.slow
def test_eval_loss_falls_for_both_tasks_and_every_task_reaches_mlflow(
    tiny_tokenizer_dir: Path, sources: dict[str, str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        **TRAINING,
        "model": str(tiny_tokenizer_dir),
        "weights": {"lists": 1, "reverse": 1},
    }
    result = run_stage(
        "multitask",
        [sources["lists"], sources["reverse"]],
        str(tmp_path / "out"),
        overrides=overrides,
        tracking_uri=uri,
        experiment="multitask-test",
    )

    metrics = result.metrics
    # measured: each task from about 6.3 to under 4 in 30 steps; an untrained model stays at 6.2
    for task in ("lists", "reverse"):
        assert metrics[f"eval_loss/{task}"] < 0.8 * metrics[f"eval_loss_initial/{task}"], task
        assert metrics[f"mixture_weight/{task}"] == pytest.approx(0.5)
    assert metrics["eval_loss"] < 0.8 * metrics["eval_loss_initial"]
    # the overall loss is the loss of all eval conversations: between the two tasks' losses
    per_task = sorted(metrics[f"eval_loss/{t}"] for t in ("lists", "reverse"))
    assert per_task[0] <= metrics["eval_loss"] <= per_task[1]
    assert metrics["global_step"] == 30
    assert (Path(result.model_dir) / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["eval_loss/reverse"] == pytest.approx(metrics["eval_loss/reverse"])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("multitask-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["alignpipe.stage"] == "multitask"
    for task in ("lists", "reverse"):
        assert run.data.metrics[f"eval_loss/{task}"] == pytest.approx(metrics[f"eval_loss/{task}"])
        assert run.data.metrics[f"eval_loss_initial/{task}"] == pytest.approx(
            metrics[f"eval_loss_initial/{task}"]
        )
    assert run.data.params["weights"] == "{'lists': 1, 'reverse': 1}"
    assert len(client.get_metric_history(run.info.run_id, "loss")) >= 3

    # the pipeline's report shows every task before and after
    numbers = multitask.write_report(metrics, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| reverse |" in report and "| lists |" in report and "| all tasks |" in report
    assert numbers["eval_loss/lists"] == metrics["eval_loss/lists"]


def test_mixture_from_weights_or_from_sizes_at_a_temperature() -> None:
    model = {"model": "some/model"}
    weighted = make_config("some/model", weights={"a": 3, "b": 1})
    assert multitask.mixture(weighted, {"a": 10, "b": 1000}) == {"a": 0.75, "b": 0.25}

    # temperature 1: proportional to size; temperature 2: to the square root of the size
    sizes = {"a": 100, "b": 25}
    proportional = load_config(multitask.MultitaskStageConfig, None, model)
    assert multitask.mixture(proportional, sizes) == pytest.approx({"a": 0.8, "b": 0.2})
    flatter = load_config(multitask.MultitaskStageConfig, None, {**model, "temperature": 2})
    assert multitask.mixture(flatter, sizes) == pytest.approx({"a": 10 / 15, "b": 5 / 15})

    with pytest.raises(ConfigError, match="give one weight per task"):
        multitask.mixture(make_config("some/model", weights={"a": 1}), sizes)


def test_interleaving_draws_tasks_by_their_weights_and_repeats_with_the_seed(
    sources: dict[str, str],
) -> None:
    train = multitask.load_tasks(list(sources.values()), "train", prefix=True)
    config = make_config("some/model", weights={"lists": 3, "reverse": 1})
    config.stopping_strategy = "first_exhausted"
    probabilities = multitask.mixture(config, {t: len(d) for t, d in train.items()})
    mixed = multitask.interleave(train, probabilities, config)

    first_words = [row["messages"][0]["content"].split()[0] for row in mixed]
    share = first_words.count("[lists]") / len(first_words)
    # first_exhausted stops when one task runs out: reverse (about 170 rows) at a quarter
    assert 0.65 < share < 0.85
    assert set(first_words) == {"[lists]", "[reverse]"}
    again = multitask.interleave(train, probabilities, config)
    assert [r["messages"] for r in again] == [r["messages"] for r in mixed]


def test_task_prefix_marks_the_first_user_turn_only(sources: dict[str, str]) -> None:
    plain = multitask.load_tasks([sources["reverse"]], "eval", prefix=False)["reverse"]
    tagged = multitask.load_tasks([sources["reverse"]], "eval", prefix=True)["reverse"]
    for before, after in zip(plain, tagged, strict=True):
        user, answer = after["messages"]
        assert user["content"] == "[reverse] " + before["messages"][0]["content"]
        assert answer == before["messages"][1]


def test_conversations_without_a_task_are_refused_with_the_fix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "plain.jsonl", reverse_task(40))
    prep.run(prep.PrepConfig(), [str(path)], str(tmp_path / "untagged"))
    with pytest.raises(DataError, match="task=NAME"):
        multitask.load_tasks([str(tmp_path / "untagged")], "train", prefix=False)


def test_a_task_name_unfit_for_metric_names_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "plain.jsonl", reverse_task(40))
    prep.run(prep.PrepConfig(task="reverse: hard"), [str(path)], str(tmp_path / "odd"))
    with pytest.raises(DataError, match="task=NAME of letters"):
        multitask.load_tasks([str(tmp_path / "odd")], "train", prefix=False)


@pytest.mark.parametrize(
    ("values", "fix"),
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"weights": {"a": -1}}, "weights.a must be a number >= 0"),
        ({"weights": {"a": 0}}, "give at least one task a positive weight"),
        ({"stopping_strategy": "never"}, "all_exhausted or first_exhausted"),
        (
            {"peft": {"method": "prompt_tuning"}, "save_adapter_only": True, "packing": True},
            "set packing=false",
        ),
    ],
)
def test_bad_options_name_the_fix(values: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        load_config(multitask.MultitaskStageConfig, None, {"model": "some/model", **values})


def test_cli_lists_the_options_and_refuses_untagged_data(
    tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["options", "multitask"]) == 0
    listed = capsys.readouterr().out
    assert "weights (" in listed and "temperature (" in listed and "task_prefix (" in listed

    path = write_jsonl(tmp_path / "plain.jsonl", reverse_task(40))
    prep.run(prep.PrepConfig(), [str(path)], str(tmp_path / "untagged"))
    argv = ["multitask", str(tmp_path / "untagged"), "--output", str(tmp_path / "out")]
    assert main([*argv, f"model={tiny_tokenizer_dir}", "peft.method=none"]) == 2
    assert "task=NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_prompt_tuning_trains_a_soft_prompt_on_the_mixture(
    tiny_tokenizer_dir: Path, sources: dict[str, str], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    values = {
        "peft": {"method": "prompt_tuning"},
        "save_adapter_only": True,
        "task_prefix": True,
        "training": {**TRAINING["training"], "max_steps": 20, "learning_rate": 0.3},
    }
    config = make_config(str(tiny_tokenizer_dir), **values)
    [initial] = [
        p.detach().clone() for p in sft.load_model(config)[0].parameters() if p.requires_grad
    ]
    result = multitask.run(config, list(sources.values()), str(tmp_path / "out"))

    folder = Path(result.model_dir)
    assert not (folder / "model.safetensors").exists()  # the adapter alone, never merged
    trained = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]
    assert not torch.allclose(trained, initial)
    # measured: lists 6.28 -> 6.11, reverse 6.28 -> 6.14 in 20 steps of an 8-token soft prompt
    # on the frozen random model
    for task in ("lists", "reverse"):
        loss, initial_loss = (result.metrics[f"eval_loss{s}/{task}"] for s in ("", "_initial"))
        assert loss < initial_loss - 0.05, task


def test_components_merge_the_tagged_sources_and_report_every_task(
    sources: dict[str, str], tmp_path: Path
) -> None:
    from kfp.dsl import HTML, Dataset, Markdown, Metrics

    from components.multitask import merge_tasks, multitask_report

    def artifact(cls, name):
        return cls(name=name, uri=str(tmp_path / name), metadata={})

    inputs = [Dataset(name=t, uri=folder, metadata={}) for t, folder in sources.items()]
    merged, counts = artifact(Dataset, "merged"), artifact(Metrics, "counts")
    merge_tasks.python_func(sources=inputs, data=merged, counts=counts)
    train = multitask.load_tasks([merged.path], "train", prefix=False)
    apart = multitask.load_tasks(list(sources.values()), "train", prefix=False)
    assert {t: len(d) for t, d in train.items()} == {t: len(d) for t, d in apart.items()}
    assert counts.metadata["train/reverse"] == len(apart["reverse"])

    training = artifact(Metrics, "training")
    training.metadata.update(
        {"eval_loss": 3.0, "eval_loss_initial": 6.0, "mixture_weight/a": 0.25}
        | {"eval_loss/a": 2.0, "eval_loss_initial/a": 6.5, "eval_loss/b": 4.0}
        | {"eval_loss_initial/b": 5.5, "mixture_weight/b": 0.75}
    )
    report, page = artifact(Markdown, "report"), artifact(HTML, "page")
    multitask_report.python_func(training=training, report=report, report_html=page)
    text = Path(report.path).read_text()
    assert "| a | 6.5 | 2 | -4.5 | 0.25 |" in text
    assert "| b | 5.5 | 4 | -1.5 | 0.75 |" in text
    assert "| all tasks | 6 | 3 | -3 |  |" in text
    assert "<td>-4.5</td>" in Path(page.path).read_text()
