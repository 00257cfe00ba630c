"""Multitask stage: supervised fine-tuning on a weighted mixture of tagged conversation sets.

Each conversation carries its task (the ``task`` column, set by ``alignpipe prep task=NAME``).
The train splits are interleaved by task with fixed weights or by temperature sampling over
their sizes, an optional ``[task]`` prefix tells the model which task a prompt belongs to, and
the eval loss is measured per task and overall, before and after. Training is the SFT stage's:
the same model loading, ``SFTTrainer``, checkpoints and saving.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alignpipe import reports, sft, storage
from alignpipe.config import flatten, option
from alignpipe.data.build import read_stage_split, split_uri
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker, Tracker
from alignpipe.training import (
    TrainResult,
    local_output,
    perplexity,
    resume_checkpoint,
    save_stage_model,
    train_from,
)

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = reports.MARKDOWN_FILE
# task names end up in metric names (eval_loss/<task>) in MLflow and KFP
_TASK_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass
class MultitaskStageConfig(sft.SftStageConfig):
    """SFT over a weighted mixture of tasks, with eval loss per task (TRL ``SFTTrainer``)."""

    stage: ClassVar[str] = "multitask"

    weights: dict[str, float] | None = option(
        None,
        help="Sampling weight per task ({name: weight}, normalised); every task of the data "
        "must be named. Unset = temperature sampling over the task sizes.",
    )
    temperature: float = option(
        1.0,
        help="Without weights, sample task t with probability proportional to size_t ** (1 / "
        "temperature): 1 = proportional to size, larger values move toward uniform.",
    )
    task_prefix: bool = option(
        False,
        help="Start each conversation's first user turn with '[task] ', so one model can tell "
        "the tasks apart; evaluation and serving must add the same prefix.",
    )
    stopping_strategy: str = option(
        "all_exhausted",
        help="When the mixture ends (datasets.interleave_datasets): all_exhausted oversamples "
        "small tasks until every task was seen once, first_exhausted stops at the first.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}; try 1.0")
        if self.stopping_strategy not in ("all_exhausted", "first_exhausted"):
            raise ConfigError(
                "stopping_strategy must be all_exhausted or first_exhausted, got "
                f"{self.stopping_strategy!r}"
            )
        if self.weights is not None:
            if not isinstance(self.weights, Mapping) or not self.weights:
                raise ConfigError(
                    "weights must map task names to numbers, e.g. weights={lists: 2, "
                    "copy: 1}; leave it unset for temperature sampling"
                )
            for task, weight in self.weights.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                    raise ConfigError(f"weights.{task} must be a number >= 0, got {weight!r}")
            if not sum(self.weights.values()) > 0:
                raise ConfigError("weights are all 0; give at least one task a positive weight")


def run(
    config: MultitaskStageConfig,
    inputs: str | Sequence[str],
    output: str,
    tracker: Tracker | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` on the mixture of every task in ``inputs``; save under ``output``.

    Args:
        config: The stage config.
        inputs: Prep output folders (local or ``s3://``) of conversations tagged with a task;
            a folder may hold several tasks, and a task may span several folders.
        output: A local folder; gets ``model/``, ``checkpoints/`` and ``metrics.json`` as SFT.
        tracker: Where params and metrics go; a :class:`NullTracker` when None.

    Returns:
        The model folder and the metrics: those of SFT (``eval_loss``, ``eval_loss_initial``,
        ``perplexity``, ``train_tokens``, ...) for all tasks together, plus
        ``eval_loss/<task>``, ``eval_loss_initial/<task>`` and ``mixture_weight/<task>``.

    Raises:
        ConfigError: ``weights`` does not name exactly the tasks of the data.
        DataError: A folder is not a prep output, or holds conversations without a task.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = local_output(output, "multitask")
    folders = [inputs] if isinstance(inputs, str) else list(inputs)

    # data: the train splits mixed by task, the eval splits kept apart
    train = load_tasks(folders, "train", config.task_prefix, tracker)
    evals = load_tasks(folders, "eval", config.task_prefix, tracker)
    if set(evals) != set(train):
        raise DataError(
            f"tasks {sorted(set(train) ^ set(evals))} are missing from one split; rerun prep "
            "with eval_fraction > 0 for every task"
        )
    probabilities = mixture(config, {task: len(rows) for task, rows in train.items()})
    mixed = interleave(train, probabilities, config)

    # the SFT stage's model and trainer, evaluating each task on its own
    model, tokenizer = sft.load_model(config)
    trainer = sft.build_trainer(config, model, tokenizer, mixed, evals, out, tracker)
    everything = _concatenate(list(evals.values()))

    # train between two measurements of every task's eval loss
    resume = resume_checkpoint(out, config.training, ranks=trainer.args)
    initial = held_out(trainer, everything, list(evals))
    log.info("multitask: training %d steps on %s", config.training.max_steps, probabilities)
    started = time.monotonic()
    train_from(trainer, resume)
    seconds = time.monotonic() - started
    final = held_out(trainer, everything, list(evals))

    # log: the SFT metrics of all tasks together, then one of each per task
    metrics = sft.sft_metrics(trainer, initial.pop(""), final.pop(""), seconds, resume)
    for task in evals:
        metrics[f"eval_loss/{task}"] = final[task]
        metrics[f"eval_loss_initial/{task}"] = initial[task]
        metrics[f"perplexity/{task}"] = perplexity(final[task])
        metrics[f"mixture_weight/{task}"] = probabilities[task]
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    tracker.log_dict(metrics, METRICS_FILE)
    log.info("multitask: eval loss per task %s", {t: round(v, 4) for t, v in final.items()})

    # save
    model_dir = save_stage_model(config, trainer.model, tokenizer, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


def load_tasks(
    folders: Sequence[str], split: str, prefix: bool, tracker: Tracker | None = None
) -> dict[str, Dataset]:
    """One split of every folder, grouped by task, as ``datasets.Dataset`` of ``messages``.

    Raises:
        DataError: A folder lacks the split or holds records without a ``task``.
    """
    from datasets import Dataset

    by_task: dict[str, list[dict[str, Any]]] = {}
    for data in folders:
        records, digest = read_stage_split(
            data,
            split,
            "give multitask prep output folders (alignpipe prep INPUT --output DIR task=NAME)",
        )
        for record in records:
            task = record.get("task") if "messages" in record else None
            if not task:
                raise DataError(
                    f"{data}/{split}.parquet holds records without a task; tag each source "
                    "with its task: alignpipe prep INPUT --output DIR task=NAME"
                )
            if not _TASK_NAME.match(task):
                raise DataError(
                    f"task name {task!r} in {data} is not usable in metric names; re-run prep "
                    "with a task=NAME of letters, digits, '_', '-' and '.'"
                )
            messages = _with_prefix(record["messages"], task) if prefix else record["messages"]
            by_task.setdefault(task, []).append({"messages": messages})
        if tracker is not None:
            uri = split_uri(data, split)
            tracker.log_dataset(f"conversation-{split}", uri, digest, split, len(records))
    if not by_task:
        raise DataError(f"the {split} splits of {', '.join(folders)} are empty; prep more data")
    log.info("multitask: %s %s conversations", {t: len(r) for t, r in by_task.items()}, split)
    return {task: Dataset.from_list(rows) for task, rows in sorted(by_task.items())}


def mixture(config: MultitaskStageConfig, sizes: Mapping[str, int]) -> dict[str, float]:
    """The probability of drawing each task: normalised weights, or sizes ** (1 / temperature).

    Raises:
        ConfigError: ``weights`` is set and does not name exactly the tasks in ``sizes``.
    """
    if config.weights is not None:
        if set(config.weights) != set(sizes):
            raise ConfigError(
                f"weights name {sorted(config.weights)} but the data holds tasks "
                f"{sorted(sizes)}; give one weight per task"
            )
        raw = {task: float(config.weights[task]) for task in sizes}
    else:
        raw = {task: size ** (1.0 / config.temperature) for task, size in sizes.items()}
    total = sum(raw.values())
    return {task: value / total for task, value in raw.items()}


def interleave(
    datasets: Mapping[str, Dataset], probabilities: Mapping[str, float], config: Any
) -> Dataset:
    """The train mixture: tasks drawn at random by ``probabilities``, seeded by the run."""
    from datasets import interleave_datasets

    names = [task for task in datasets if probabilities[task] > 0]
    return interleave_datasets(
        [datasets[task] for task in names],
        probabilities=[probabilities[task] for task in names],
        seed=config.training.seed,
        stopping_strategy=config.stopping_strategy,
    )


def held_out(trainer: Any, everything: Dataset, tasks: Sequence[str]) -> dict[str, float]:
    """Eval loss of each task and, under the key ``""``, of all eval conversations together."""
    # the trainer holds one eval set per task and prefixes each one's metrics with its name
    per_task = trainer.evaluate()
    losses = {task: per_task[f"eval_{task}_loss"] for task in tasks}
    losses[""] = trainer.evaluate(eval_dataset=everything)["eval_loss"]
    return losses


def _with_prefix(messages: list[dict[str, str]], task: str) -> list[dict[str, str]]:
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    tagged = [dict(m) for m in messages]
    tagged[first]["content"] = f"[{task}] {tagged[first]['content']}"
    return tagged


def _concatenate(datasets: list[Dataset]) -> Dataset:
    from datasets import concatenate_datasets

    return concatenate_datasets(datasets)


# -- pipeline helpers: one data folder from several prep outputs, and the per-task report ------


def merge(folders: Sequence[str], output: str) -> dict[str, int]:
    """Concatenate the splits of several prep output folders into ``output``; count by task.

    The multitask pipeline preps each source on its own (with its task tag), then merges them
    so that one folder feeds both the base model's tokenizer and the multitask stage.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split in ("train", "eval"):
        tables = []
        for data in folders:
            with storage.local_path(f"{data.rstrip('/')}/{split}.parquet") as path:
                tables.append(pq.read_table(path))
        table = pa.concat_tables(tables, promote_options="default")
        pq.write_table(table, out / f"{split}.parquet")
        for task in table.column("task").to_pylist():
            key = f"{split}/{task}"
            counts[key] = counts.get(key, 0) + 1
    (out / "stats.json").write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return counts


def write_report(metrics: Mapping[str, float], output: str | Path) -> dict[str, float]:
    """Write ``report.md`` and ``report.html``: eval loss per task before and after training.

    Returns:
        The per-task and overall numbers of the table, by metric name.
    """
    tasks = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("eval_loss/"))
    if not tasks:
        raise DataError("the metrics hold no eval_loss/<task>; pass the multitask stage's metrics")
    rows = [("all tasks", metrics["eval_loss_initial"], metrics["eval_loss"], None)]
    rows += [
        (
            task,
            metrics[f"eval_loss_initial/{task}"],
            metrics[f"eval_loss/{task}"],
            metrics.get(f"mixture_weight/{task}"),
        )
        for task in tasks
    ]
    header = ("task", "eval loss before", "eval loss after", "change", "mixture weight")
    cells = [
        (name, f"{a:.4g}", f"{b:.4g}", f"{b - a:+.4g}", "" if w is None else f"{w:.3g}")
        for name, a, b, w in rows
    ]
    reports.write_table("Multitask evaluation: held-out loss per task", header, cells, output)
    keys = ["eval_loss", "eval_loss_initial"]
    keys += [f"eval_loss{suffix}/{t}" for t in tasks for suffix in ("", "_initial")]
    return {key: float(metrics[key]) for key in keys}
