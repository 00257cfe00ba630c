"""Supervised fine-tuning stage: train a causal LM on the prep stage's conversations.

Built on TRL's ``SFTTrainer``: loss on assistant tokens only by default, a LoRA adapter, prompt
tuning or full fine-tuning through the peft options, optional packing. Checkpoints under
``OUTPUT/checkpoints`` let a retried run resume where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alignpipe import models
from alignpipe.config import flatten, option
from alignpipe.data.build import read_stage_split, split_uri
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker, Tracker
from alignpipe.training import (
    ModelStageOptions,
    TrainResult,
    checkpoint_callbacks,
    checkpoint_step,
    local_output,
    perplexity,
    quiet_printing,
    resume_checkpoint,
    save_stage_model,
    tracker_callback,
    train_from,
    trainer_arguments,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTTrainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class SftStageConfig(ModelStageOptions):
    """Supervised fine-tuning of a causal LM on conversations (TRL ``SFTTrainer``)."""

    stage: ClassVar[str] = "sft"

    max_length: int = option(
        512, help="Longest training sequence in tokens; longer conversations are cut at the end."
    )
    packing: bool = option(
        False,
        help="Pack several conversations into each max_length row (best-fit, no attention "
        "across them): fewer padding tokens, faster on short data.",
    )
    completion_only_loss: bool = option(
        True,
        help="Loss on assistant tokens only (needs {% generation %} markers in the chat "
        "template, or a template TRL knows how to patch); false = loss on every token.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ConfigError(f"max_length must be an integer, got {self.max_length!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.peft.method == "prompt_tuning" and self.packing:
            # The soft prompt goes in front of each row; a packed row holds several
            # conversations, and all but the first would train without it.
            raise ConfigError(
                "packing=true does not work with peft.method=prompt_tuning (one soft prompt "
                "per packed row, not per conversation); set packing=false"
            )


def run(
    config: SftStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> TrainResult:
    """Fine-tune ``config.model`` on a prep output folder and save the model under ``output``.

    Writes ``output/model`` (merged full weights, or the adapter with ``save_adapter_only``),
    ``output/checkpoints`` (every ``training.save_steps``; a rerun resumes from the newest one,
    which is what makes a retried KFP task cheap) and ``output/metrics.json``.

    Args:
        config: The stage config.
        data: A folder (local or ``s3://``) with ``train.parquet`` and ``eval.parquet`` of
            conversation records, as written by the prep stage.
        output: A local folder.
        tracker: Where params and metrics go; a :class:`NullTracker` when None.

    Returns:
        The model folder, the metrics (``eval_loss``, ``eval_loss_initial``, ``perplexity``,
        ``train_loss``, ``train_tokens``, ``train_seconds``, ...) and the checkpoint resumed from.

    Raises:
        ConfigError: The output is not local, or the chat template cannot mask assistant tokens.
        DataError: The data folder holds no conversations in one of its splits.
        ModelError: The model cannot be loaded.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = local_output(output, "sft")

    # data, model and the trainer that ties them together
    train_set, eval_set = (load_conversations(data, split, tracker) for split in ("train", "eval"))
    model, tokenizer = load_model(config)
    trainer = build_trainer(config, model, tokenizer, train_set, eval_set, out, tracker)

    # train; the eval loss before training is the baseline the stage must beat
    resume = resume_checkpoint(out, config.training, ranks=trainer.args)
    initial = trainer.evaluate()["eval_loss"]
    log.info("training %d steps (initial eval loss %.4f)", config.training.max_steps, initial)
    started = time.monotonic()
    train_from(trainer, resume)
    seconds = time.monotonic() - started
    final = trainer.evaluate()["eval_loss"]

    # log
    metrics = sft_metrics(trainer, initial, final, seconds, resume)
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    tracker.log_dict(metrics, METRICS_FILE)
    if resume:
        tracker.set_tags({"alignpipe.resumed_from": resume})
    log.info("eval loss %.4f -> %.4f in %.1f s", initial, final, seconds)

    # save
    model_dir = save_stage_model(config, trainer.model, tokenizer, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


def load_conversations(data: str, split: str, tracker: Tracker | None = None) -> Dataset:
    """Read one split of a prep output folder as a ``datasets.Dataset`` of ``messages``.

    Args:
        data: The prep stage's output folder (local or ``s3://``).
        split: ``train`` or ``eval``.
        tracker: Gets the split's fingerprint and row count as a dataset input.

    Raises:
        DataError: The split is missing, empty, or holds records other than conversations.
    """
    from datasets import Dataset

    records, digest = read_stage_split(
        data,
        split,
        "give sft the output folder of the prep stage (alignpipe prep INPUT --output DIR)",
    )
    if records and "messages" not in records[0]:
        raise DataError(
            f"{data}/{split}.parquet holds {', '.join(records[0])} records, not conversations; "
            "sft trains on the prep stage's output, not on preference pairs"
        )
    if not records:
        raise DataError(
            f"the {split} split of {data} is empty; sft needs both splits (re-run prep with "
            "more data, or with eval_fraction > 0 for the eval split)"
        )
    log.info("%d %s conversations from %s", len(records), split, data)
    if tracker is not None:
        uri = split_uri(data, split)
        tracker.log_dataset(f"conversation-{split}", uri, digest, split, len(records))
    return Dataset.from_list([{"messages": r["messages"]} for r in records])


def load_model(config: SftStageConfig) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the base model with the configured adapter attached, and its tokenizer.

    Raises:
        ConfigError: The chat template cannot render conversations, or cannot mask assistant
            tokens while ``completion_only_loss`` asks for it.
        ModelError: The model cannot be resolved or loaded.
    """
    from transformers import set_seed

    # resolve once, so that an s3:// model is downloaded once for both loaders
    path = models.resolve_model(config.model)
    tokenizer = models.load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    _check_chat_template(tokenizer, config.completion_only_loss)
    model = models.load_causal_lm(
        path, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )
    # LoRA's A matrices are random: seed them like the rest of the run
    set_seed(config.training.seed)
    model = models.attach_peft(model, config.peft)
    log.info("loaded %s (peft %s)", config.model, config.peft.method)
    return model, tokenizer


def _check_chat_template(tokenizer: PreTrainedTokenizerBase, completion_only: bool) -> None:
    """Fail before training when the conversations cannot be rendered or masked."""
    template = tokenizer.chat_template
    if not template:
        raise ConfigError(
            "the model's tokenizer has no chat template, which training on conversations "
            "needs; use a chat model, or one built with `alignpipe tiny-model`"
        )
    if not completion_only:
        return
    from trl.chat_template_utils import get_training_chat_template

    # TRL patches the templates of common model families; this fails for any other template
    # without {% generation %} markers, which TRL would report mid-way through dataset mapping.
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise ConfigError(
            "completion_only_loss=true needs a chat template that marks assistant turns with "
            "{% generation %}...{% endgeneration %}, and TRL cannot patch this model's template; "
            "set completion_only_loss=false to train on every token, or give the tokenizer a "
            "template with generation markers"
        ) from None


def build_trainer(
    config: SftStageConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset,
    output: str | Path,
    tracker: Tracker | None = None,
) -> SFTTrainer:
    """The ``SFTTrainer`` that :func:`run` trains with, its datasets tokenized and masked.

    Exposed so that a test or a notebook can inspect exactly what the stage trains on (the
    ``labels`` of ``trainer.train_dataset``, a batch from ``trainer.data_collator``).
    """
    from trl import SFTConfig, SFTTrainer

    arguments = trainer_arguments(config.training, output)
    args = SFTConfig(
        **arguments,
        max_length=config.max_length,
        # best-fit packing without padding; transformers reads the sequence boundaries from
        # the position ids, so packed conversations do not attend to each other
        packing=config.packing,
        packing_strategy="bfd",
        # eval rows stay one conversation each, so eval loss compares across packing settings
        eval_packing=False,
        assistant_only_loss=config.completion_only_loss,
        # counted in the trainer state, so the total survives a resume
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        callbacks=[
            tracker_callback(tracker or NullTracker()),
            *checkpoint_callbacks(config.training),
        ],
    )
    return quiet_printing(trainer)


def sft_metrics(
    trainer: SFTTrainer, initial: float, final: float, seconds: float, resume: str | None
) -> dict[str, float]:
    state = trainer.state
    # the restored history of a resumed run is included, so this is the run's latest window
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    metrics = {
        "eval_loss": final,
        "eval_loss_initial": initial,
        "perplexity": perplexity(final),
        "perplexity_initial": perplexity(initial),
        "train_tokens": float(state.num_input_tokens_seen),
        "train_seconds": seconds,
        "global_step": float(state.global_step),
    }
    if losses:
        metrics["train_loss"] = losses[-1]
    if resume:
        metrics["resumed_from_step"] = float(checkpoint_step(resume))
    return metrics
