"""Reward model stage: train a scalar scorer of responses on preference pairs (TRL RewardTrainer).

The SFT model becomes a sequence classifier with one output, trained with the Bradley–Terry loss
to score the chosen response of each pair above the rejected one. :class:`RewardScorer` loads a
trained reward model once and scores many (prompt, response) pairs, for PPO and evaluation.
Checkpoints under ``OUTPUT/checkpoints`` let a retried run resume where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alignpipe import models
from alignpipe.config import flatten, option
from alignpipe.data.records import message
from alignpipe.errors import ConfigError, DataError, ModelError
from alignpipe.models import PeftOptions
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
    from transformers import PreTrainedTokenizerBase
    from trl import RewardTrainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# What the held-out pairs give, before and after training (see _held_out).
EVAL_METRICS = ("accuracy", "margin", "loss")
Messages = list[dict[str, str]]


@dataclass
class RewardModelStageConfig(ModelStageOptions):
    """A reward model trained on preference pairs (TRL ``RewardTrainer``)."""

    stage: ClassVar[str] = "reward_model"

    model: str | None = option(
        None,
        help="Model to start from (required): the sft stage's output folder, a local folder, a "
        "hub id or an s3:// prefix. Its LM head is replaced by a one-output score head.",
    )
    peft: PeftOptions = option(
        default_factory=PeftOptions,
        help="lora (default): train an adapter plus the score head; none: train every weight. "
        "prompt_tuning is not supported for reward models.",
    )
    max_length: int = option(
        512, help="Longest prompt + response in tokens; longer pairs are dropped, not cut."
    )
    use_margin: bool = option(
        False,
        help="Train with each pair's margin (the annotators' agreement, from ingest): the loss "
        "asks score(chosen) - score(rejected) to exceed it. Pairs without one use 0.",
    )
    center_rewards_coefficient: float | None = option(
        None,
        help="Weight of a penalty on the squared mean reward of each pair, which keeps rewards "
        "centred on zero (0.01 is the usual value); unset = no penalty.",
    )

    def __post_init__(self) -> None:
        if self.peft.method == "prompt_tuning":
            # The soft prompt replaces input_ids by embeddings, and the classifier then cannot
            # find the last non-pad token it reads the reward from.
            raise ConfigError(
                "peft.method=prompt_tuning does not work for a reward model; use peft.method=lora "
                "or peft.method=none"
            )
        super().__post_init__()
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ConfigError(f"max_length must be an integer, got {self.max_length!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}; "
                "try 0.01, or leave it unset"
            )


def run(
    config: RewardModelStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> TrainResult:
    """Train a reward model on an ingest output folder and save it under ``output``.

    Writes ``output/model`` (a one-output sequence classifier with its tokenizer; merged full
    weights, or the adapter and score head with ``save_adapter_only``), ``output/checkpoints``
    (every ``training.save_steps``; a rerun resumes from the newest one, which is what makes a
    retried KFP task cheap) and ``output/metrics.json``.

    Args:
        config: The stage config.
        data: A folder (local or ``s3://``) with ``train.parquet`` and ``eval.parquet`` of
            preference records, as written by the ingest stage.
        output: A local folder.
        tracker: Where params and metrics go; a :class:`NullTracker` when None.

    Returns:
        The model folder, the metrics (``eval_accuracy``: share of held-out pairs whose chosen
        response scores higher; ``eval_margin``: mean score(chosen) - score(rejected);
        ``eval_loss``: mean -log sigmoid of that difference; each also as ``*_initial``, before
        training; ``train_loss``, ``train_tokens``, ``train_seconds``, ``global_step``,
        ``resumed_from_step``) and the checkpoint resumed from.

    Raises:
        ConfigError: The output is not local, or the model cannot start a reward model.
        DataError: The data folder holds no preference pairs for training.
        ModelError: The model cannot be loaded.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = local_output(output, "reward_model")

    # data, the model with a fresh score head, and the trainer that ties them together
    train_set, eval_set = (load_pairs(data, split, tracker) for split in ("train", "eval"))
    model, tokenizer = load_model(config)
    trainer = build_trainer(config, model, tokenizer, train_set, eval_set, out, tracker)

    # score the held-out pairs before training: a random head ranks them by chance
    resume = resume_checkpoint(out, config.training, ranks=trainer.args)
    initial = _held_out(trainer)
    log.info("reward_model: training %d steps", config.training.max_steps)
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
    log.info("reward_model: held-out accuracy %s in %.1f s", final.get("accuracy"), seconds)

    # save
    # the classifier reads the reward where the padding starts: the saved config must say where
    trainer.model.config.pad_token_id = tokenizer.pad_token_id
    model_dir = save_stage_model(config, trainer.model, tokenizer, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


# -- scoring -------------------------------------------------------------------------------------


class RewardScorer:
    """A trained reward model, loaded once, scoring many (prompt, response) pairs.

    It implements :class:`alignpipe.evaluate.Scorer`. Each pair is rendered with the tokenizer's
    chat template exactly as the stage rendered its training pairs (:func:`encode_conversation`),
    and the reward is the score head's output at the last token.
    """

    def __init__(self, model_ref: str, batch_size: int = 16, device: str | None = None) -> None:
        """Load the reward model and its tokenizer.

        Args:
            model_ref: The reward_model stage's output folder (or its ``model/``), an ``s3://``
                prefix or a hub id; a merged model or an adapter saved with its base reference.
            batch_size: Sequences per forward pass.
            device: torch device; unset = CUDA when available, else CPU.

        Raises:
            ConfigError: ``batch_size`` is below 1.
            ModelError: The model cannot be loaded, is not a one-output classifier, or has no
                chat template or pad token id.
        """
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        path = models.resolve_model(model_ref)
        self.tokenizer = models.load_tokenizer(path)
        if not self.tokenizer.chat_template:
            raise ModelError(
                f"the tokenizer of {model_ref} has no chat template; score with the reward "
                "model folder the reward_model stage wrote (its tokenizer has one)"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(path).to(device).eval()
        self.pad_token_id = _pad_token_id(self.model, model_ref)
        self.batch_size = batch_size

    def score(self, prompts: list[Messages], responses: list[str]) -> list[float]:
        """Return the reward of each response (an assistant turn) to its prompt messages."""
        if len(prompts) != len(responses):
            raise DataError(f"{len(prompts)} prompts but {len(responses)} responses to score")
        sequences = [
            encode_conversation(self.tokenizer, prompt, [message("assistant", response)])
            for prompt, response in zip(prompts, responses, strict=True)
        ]
        return score_sequences(self.model, sequences, self.pad_token_id, self.batch_size)


def score(
    model_ref: str, prompts: list[Messages], responses: list[str], batch_size: int = 16
) -> list[float]:
    """Score responses with a reward model in one call (loads it each time; see RewardScorer)."""
    return RewardScorer(model_ref, batch_size=batch_size).score(prompts, responses)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, completion: Messages
) -> list[int]:
    """Token ids of prompt + completion rendered whole by the chat template (as TRL renders it).

    The one encoding of the stage: training pairs and scored responses both go through it.
    """
    encoded = tokenizer.apply_chat_template([*prompt, *completion], tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def score_sequences(
    model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int
) -> list[float]:
    """The scalar reward of each token sequence, in batches, right-padded, without gradients.

    The classifier reads the reward at the last token that is not ``pad_token_id`` (which must be
    the model config's pad id); with right padding and causal attention the padding cannot change
    it, so a sequence scores the same alone or in any batch.
    """
    import torch

    device = next(model.parameters()).device
    rewards: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(list(tokens))
                mask[row, : len(tokens)] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            rewards += out.logits[:, 0].float().tolist()  # logits: (batch, 1)
    return rewards


def load_reward_model(
    ref: str, *, dtype: str = "auto", trust_remote_code: bool = False, trainable: bool = False
) -> Any:
    """Load a model as a sequence classifier with one output (``num_labels=1``), safetensors only.

    A causal LM (the SFT model) gets a new, randomly initialised score head in place of its LM
    head; a reward model comes back as saved. A folder holding a reward model's adapter
    (``adapter_config.json`` of task ``SEQ_CLS``) is loaded on its recorded base.

    Args:
        ref: A hub id, a local folder or an ``s3://`` prefix.
        dtype: ``auto`` (the dtype recorded with the weights), ``float32``, ``bfloat16`` or
            ``float16``.
        trust_remote_code: Run model code shipped with the model; off unless you trust it.
        trainable: For an adapter folder, leave the adapter weights trainable.

    Raises:
        ModelError: The reference cannot be loaded, its architecture has no sequence
            classifier in transformers, or it is an adapter of another task.
    """
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    path = models.resolve_model(ref)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        return _load_adapter(folder, ref, dtype, trust_remote_code, trainable)
    try:
        # quiet about the expected: the new score.weight, and the dropped lm_head
        with suppress_seqcls_warning():
            return AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                dtype=_torch_dtype(dtype),
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
    except OSError as err:
        raise ModelError(
            f"cannot load {ref!r} as a reward model: {str(err).strip().splitlines()[0]}; check "
            "that it holds safetensors weights (or pre-download hub models into the HF cache)"
        ) from err
    except ValueError as err:
        raise ModelError(
            f"{ref!r} cannot become a reward model: transformers has no sequence classifier for "
            "its architecture; start from a model family that has one (Llama, Qwen2, Mistral, "
            "GPT-2, ...)"
        ) from err


def _load_adapter(
    folder: Path, ref: str, dtype: str, trust_remote_code: bool, trainable: bool
) -> Any:
    from peft import PeftConfig, PeftModel

    adapter = PeftConfig.from_pretrained(str(folder))
    task = getattr(adapter.task_type, "value", adapter.task_type)
    if task != "SEQ_CLS":
        raise ModelError(
            f"{ref} holds a {task} adapter, not a reward model's; start the reward "
            "model from a merged model (run sft with save_adapter_only=false)"
        )
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"adapter folder {folder} holds no safetensors weights; check the path")
    base = load_reward_model(
        adapter.base_model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)


def _torch_dtype(dtype: str) -> Any:
    if dtype == "auto":
        return "auto"
    import torch

    return getattr(torch, dtype)


def _pad_token_id(model: Any, ref: str) -> int:
    pad = model.config.pad_token_id
    if pad is None:
        raise ModelError(
            f"the reward model {ref} has no pad_token_id in its config, so its reward position "
            "is unknown; use a model saved by the reward_model stage"
        )
    return int(pad)


# -- the stage's steps ---------------------------------------------------------------------------


def load_pairs(data: str, split: str, tracker: Tracker | None = None) -> Dataset | None:
    """Read one split of an ingest output folder, with each pair's ``margin`` (or None).

    See :func:`alignpipe.training.load_preference_pairs`: None for an empty eval split.
    """
    return load_preference_pairs(data, split, "reward_model", tracker, extra=("margin",))


def load_model(config: RewardModelStageConfig) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the starting model as a one-output classifier, and its tokenizer; no adapter yet.

    The adapter goes to TRL as a config (see :func:`build_trainer`). A starting reward model
    saved as an adapter is merged first.

    Raises:
        ConfigError: The tokenizer has no chat template, or the starting model is an adapter
            while ``save_adapter_only`` asks to save a new adapter against it.
        ModelError: The model cannot be resolved or loaded as a reward model.
    """
    from peft import PeftModel
    from transformers import set_seed

    # resolve once, so that an s3:// model is downloaded once for both loaders
    path = models.resolve_model(config.model)
    tokenizer = models.load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    if not tokenizer.chat_template:
        raise ConfigError(
            "the model's tokenizer has no chat template, which rendering preference pairs "
            "needs; use a chat model, or one built with `alignpipe tiny-model`"
        )
    # the new score head is random: seed it like the rest of the run
    set_seed(config.training.seed)
    model = load_reward_model(path, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    if isinstance(model, PeftModel):
        if config.save_adapter_only:
            raise ConfigError(
                f"the starting model {config.model} is an adapter; set save_adapter_only=false "
                "(a new adapter could not name its base, the merge of base and old adapter)"
            )
        model = model.merge_and_unload()
    log.info("reward_model: loaded %s (peft %s)", config.model, config.peft.method)
    return model, tokenizer


def build_trainer(
    config: RewardModelStageConfig,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    output: str | Path,
    tracker: Tracker | None = None,
) -> RewardTrainer:
    """The ``RewardTrainer`` that :func:`run` trains with, its pairs tokenized.

    Exposed so that a test or a notebook can inspect what the stage trains on (the
    ``chosen_ids`` of ``trainer.train_dataset``, a batch from ``trainer.data_collator``).
    The pairs are tokenized here with :func:`encode_conversation`, the encoding
    :class:`RewardScorer` uses, so training and scoring cannot render a pair differently.
    With LoRA, peft trains the score head in full alongside the adapter (``modules_to_save``).
    """
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        **trainer_arguments(config.training, output),
        max_length=config.max_length,
        center_rewards_coefficient=config.center_rewards_coefficient,
        # prompt + chosen and prompt + rejected, without padding; counted in the trainer
        # state, so the total survives a resume
        include_num_input_tokens_seen="non_padding",
    )
    datasets = [_tokenize(d, tokenizer, config.use_margin) for d in (train_set, eval_set)]
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=tokenizer,
        peft_config=models.peft_config(model, config.peft, task="SEQ_CLS"),
        callbacks=[
            tracker_callback(tracker or NullTracker()),
            *checkpoint_callbacks(config.training),
        ],
    )
    for name, before, after in (
        ("train", train_set, trainer.train_dataset),
        ("eval", eval_set, trainer.eval_dataset),
    ):
        if before is not None and len(after) < len(before):
            log.warning(
                "reward_model: dropped %d of %d %s pairs longer than max_length=%d",
                len(before) - len(after),
                len(before),
                name,
                config.max_length,
            )
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"every training pair is longer than max_length={config.max_length} tokens; "
            "raise max_length"
        )
    return quiet_printing(trainer)


def _tokenize(pairs: Dataset | None, tokenizer: Any, use_margin: bool) -> Dataset | None:
    """``chosen_ids``/``rejected_ids`` (and ``margin``), the processed columns TRL accepts."""
    if pairs is None:
        return None
    missing = sum(m is None for m in pairs["margin"]) if use_margin else 0
    if missing:
        log.warning("reward_model: %d of %d pairs have no margin; using 0", missing, len(pairs))

    def encode(row: Mapping[str, Any]) -> dict[str, Any]:
        encoded = {
            "chosen_ids": encode_conversation(tokenizer, row["prompt"], row["chosen"]),
            "rejected_ids": encode_conversation(tokenizer, row["prompt"], row["rejected"]),
        }
        if use_margin:
            encoded["margin"] = float(row["margin"] or 0.0)
        return encoded

    return pairs.map(encode, remove_columns=pairs.column_names, desc="Tokenizing pairs")


def _held_out(trainer: RewardTrainer) -> dict[str, float]:
    """Pairwise accuracy, mean margin and Bradley–Terry loss on the eval pairs ({} without any).

    Computed from each pair's two scores rather than TRL's per-batch averages, so that every pair
    weighs the same; the loss leaves out the margin and centring terms, so it compares across
    settings.
    """
    from alignpipe.evaluate import preference_accuracy

    if trainer.eval_dataset is None or len(trainer.eval_dataset) == 0:
        return {}
    model = trainer.model.eval()
    pad = model.config.pad_token_id
    batch = trainer.args.per_device_eval_batch_size
    chosen = score_sequences(model, trainer.eval_dataset["chosen_ids"], pad, batch)
    rejected = score_sequences(model, trainer.eval_dataset["rejected_ids"], pad, batch)
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "accuracy": preference_accuracy(chosen, rejected),
        "margin": sum(gaps) / len(gaps),
        "loss": sum(_softplus(-gap) for gap in gaps) / len(gaps),
    }


def _softplus(x: float) -> float:
    # -log sigmoid(gap) = softplus(-gap), written to not overflow for large |x|
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
