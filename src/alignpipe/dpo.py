"""DPO stage: align a policy to preference pairs with TRL's ``DPOTrainer``.

The policy starts from the SFT model, which is also the reference that DPO measures its implicit
reward against. With a LoRA adapter (the default) the reference is the same model with the
adapter switched off, so only one copy of the weights sits in memory. Checkpoints under
``OUTPUT/checkpoints`` let a retried run resume where the last one stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alignpipe import models
from alignpipe.config import flatten, option
from alignpipe.errors import ConfigError
from alignpipe.tracking import NullTracker, Tracker
from alignpipe.training import (
    ModelStageOptions,
    TrainResult,
    checkpoint_callbacks,
    load_preference_pairs,
    local_output,
    pair_trainer_metrics,
    quiet_printing,
    resume_checkpoint,
    save_stage_model,
    tracker_callback,
    train_from,
    trainer_arguments,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import DPOTrainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# The losses TRL 1.16's DPOTrainer implements (DPOConfig.loss_type).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# What evaluate() reports on the held-out pairs, without its "eval_" prefix.
EVAL_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
)


@dataclass
class DpoStageConfig(ModelStageOptions):
    """Direct preference optimisation of an SFT model on preference pairs (TRL ``DPOTrainer``)."""

    stage: ClassVar[str] = "dpo"

    beta: float = option(
        0.1,
        help="How far the policy may move from the reference: higher keeps it closer. For ipo "
        "it is the regulariser tau (the target margin of log-ratios is 1 / (2 beta)).",
    )
    loss_type: str = option(
        "sigmoid",
        help="sigmoid (the DPO paper), ipo, hinge, robust, or another loss TRL implements: "
        + ", ".join(LOSS_TYPES[3:])
        + ".",
    )
    label_smoothing: float = option(
        0.0,
        help="robust: the assumed share of flipped labels, in [0, 0.5); exo_pair needs it > 0 "
        "(the paper uses 1e-3). Ignored by the other losses.",
    )
    precompute_ref_log_probs: bool = option(
        False,
        help="Score every pair with the reference once before training instead of at every "
        "step: saves the reference's forward passes and, for full fine-tuning, its copy.",
    )
    max_length: int | None = option(
        1024,
        help="Longest prompt + response in tokens; longer pairs are cut at the end, pairs "
        "whose prompt alone fills it are dropped. Unset = no limit.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(
                f"beta must be positive, got {self.beta}; the usual range is 0.01-0.5"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )
        if self.loss_type == "exo_pair" and self.label_smoothing <= 0:
            raise ConfigError("loss_type=exo_pair needs label_smoothing > 0; try 1e-3")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or self.max_length < 2
        ):
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length!r}")


def run(
    config: DpoStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> TrainResult:
    """Train ``config.model`` with DPO on an ingest output folder and save it under ``output``.

    Writes ``output/model`` (merged full weights, or the adapter with ``save_adapter_only``),
    ``output/checkpoints`` (every ``training.save_steps``; a rerun resumes from the newest one,
    which is what makes a retried KFP task cheap) and ``output/metrics.json``.

    The held-out pairs are scored before and after training. Before, a LoRA or fully
    fine-tuned policy is the reference, so every implicit reward is 0: accuracy 0 (a tie is not
    a win), margin 0 and, for the sigmoid loss, loss ln 2. They are logged as ``*_initial`` all
    the same, as the check that the reference is what it should be (a prompt-tuning policy
    starts with a random soft prompt, so it starts elsewhere).

    Args:
        config: The stage config.
        data: A folder (local or ``s3://``) with ``train.parquet`` and ``eval.parquet`` of
            preference records, as written by the ingest stage.
        output: A local folder.
        tracker: Where params and metrics go; a :class:`NullTracker` when None.

    Returns:
        The model folder, the metrics (``eval_rewards/accuracies``, ``eval_rewards/margins``,
        ``eval_loss``, each also as ``*_initial``; ``train_loss``, ``train_tokens``,
        ``train_seconds``, ``global_step``, ``resumed_from_step``) and the checkpoint resumed
        from.

    Raises:
        ConfigError: The output is not local, or the starting model is an adapter that cannot
            be merged.
        DataError: The data folder holds no preference pairs for training.
        ModelError: The model cannot be loaded.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = local_output(output, "dpo")

    # data, the policy and the trainer that holds the reference
    train_set, eval_set = (load_pairs(data, split, tracker) for split in ("train", "eval"))
    policy, tokenizer = load_policy(config)
    trainer = build_trainer(config, policy, tokenizer, train_set, eval_set, out, tracker)

    # score the held-out pairs before training: the baseline the stage must beat
    resume = resume_checkpoint(out, config.training, ranks=trainer.args)
    initial = _held_out(trainer)
    log.info("dpo: training %d steps (%s loss)", config.training.max_steps, config.loss_type)
    started = time.monotonic()
    train_loss = train_from(trainer, resume)
    seconds = time.monotonic() - started
    final = _held_out(trainer)

    # log
    metrics = pair_trainer_metrics(trainer, train_loss, initial, final, seconds, resume)
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    tracker.log_dict(metrics, METRICS_FILE)
    if resume:
        tracker.set_tags({"alignpipe.resumed_from": resume})
    log.info("dpo: held-out reward accuracy %s in %.1f s", final.get("rewards/accuracies"), seconds)

    # save
    model_dir = save_stage_model(config, trainer.model, tokenizer, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


def load_pairs(data: str, split: str, tracker: Tracker | None = None) -> Dataset | None:
    """Read one split of an ingest output folder in TRL's conversational preference format.

    See :func:`alignpipe.training.load_preference_pairs`: None for an empty eval split.
    """
    return load_preference_pairs(data, split, "dpo", tracker)


def load_policy(config: DpoStageConfig) -> tuple[Any, Any]:
    """Load the starting model and its tokenizer, with no adapter of this stage attached yet.

    The adapter goes to TRL as a config (see :func:`build_trainer`). A starting model saved as
    a LoRA adapter (``sft`` with ``save_adapter_only``) is merged first: the reference must be
    the SFT model itself, and TRL takes the model with every adapter off as the reference.

    Raises:
        ConfigError: The starting model is an adapter that cannot be merged, or one while
            ``save_adapter_only`` asks to save the new adapter against it.
        ModelError: The model cannot be resolved or loaded.
    """
    from peft import PeftModel

    # resolve once, so that an s3:// model is downloaded once for both loaders
    path = models.resolve_model(config.model)
    tokenizer = models.load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    policy = models.load_causal_lm(
        path, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )
    if isinstance(policy, PeftModel):
        if policy.peft_config["default"].is_prompt_learning:
            # the reference must be the SFT model itself, and a soft prompt cannot be folded
            # into the weights the way a LoRA update can
            raise ConfigError(
                f"the starting model {config.model} is a prompt-tuning adapter, which cannot be "
                "merged into a reference model; start dpo from an sft model trained with "
                "peft.method=lora or none (prompt tuning in dpo itself works)"
            )
        if config.save_adapter_only or not hasattr(policy, "merge_and_unload"):
            raise ConfigError(
                f"the starting model {config.model} is an adapter; save the sft model merged "
                "(save_adapter_only=false there), or set save_adapter_only=false here"
            )
        policy = policy.merge_and_unload()
        log.info("dpo: merged the starting model's adapter into its base weights")
    log.info("dpo: loaded %s (peft %s)", config.model, config.peft.method)
    return policy, tokenizer


def build_trainer(
    config: DpoStageConfig,
    policy: Any,
    tokenizer: Any,
    train_set: Dataset,
    eval_set: Dataset | None,
    output: str | Path,
    tracker: Tracker | None = None,
) -> DPOTrainer:
    """The ``DPOTrainer`` that :func:`run` trains with, datasets tokenized, reference in place.

    Exposed so that a test or a notebook can inspect what the stage trains (``trainer.model``,
    ``trainer.ref_model``, a batch from ``trainer.data_collator``).

    The reference: with an adapter, TRL wraps ``policy`` itself from the adapter's config and
    computes the reference with the adapter disabled (``trainer.ref_model`` is None). Handed a
    ready ``PeftModel`` instead, TRL would keep a second adapter as the reference. For full
    fine-tuning the reference is a frozen copy of ``policy`` (twice the weight memory), made
    here rather than reloaded by TRL from ``config._name_or_path``, which after a merged SFT
    adapter names the base model, not the SFT model. With ``precompute_ref_log_probs`` there is
    no copy: the policy scores every pair before its first step.
    """
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **trainer_arguments(config.training, output),
        beta=config.beta,
        loss_type=[config.loss_type],
        label_smoothing=config.label_smoothing,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        max_length=config.max_length,
        trust_remote_code=config.trust_remote_code,
        # both sides of every pair, prompt and response, without padding; counted in the
        # trainer state, so the total survives a resume
        include_num_input_tokens_seen="non_padding",
    )
    full = config.peft.method == "none"
    reference = None
    if full and not config.precompute_ref_log_probs:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=models.peft_config(policy, config.peft),
        callbacks=[
            tracker_callback(tracker or NullTracker()),
            *checkpoint_callbacks(config.training),
        ],
    )
    return quiet_printing(trainer)


def _held_out(trainer: DPOTrainer) -> dict[str, float]:
    """Implicit-reward accuracy, margins and loss on the eval pairs ({} without them)."""
    if trainer.eval_dataset is None:
        return {}
    scores = trainer.evaluate()
    return {name: scores[f"eval_{name}"] for name in EVAL_METRICS if f"eval_{name}" in scores}
