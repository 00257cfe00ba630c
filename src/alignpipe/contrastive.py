"""Contrastive fine-tuning stage: train a text encoder on pairs with sentence-transformers.

The encoder is a sentence-transformers model, or any transformers backbone (a causal LM such as
an SFT output included) with a pooling layer on top. It learns from text pairs written by the
prep stage (``anchor``, ``positive``, optional ``negative`` or ``score``) or from the ingest
stage's preference pairs (prompt as anchor, chosen as positive, rejected as hard negative).
Unscored pairs train with in-batch negatives (``MultipleNegativesRankingLoss``, or its cached
GradCache variant for large batches); scored pairs, STS style, with a similarity loss. The
held-out split measures Spearman correlation and retrieval accuracy@1/MRR before and after.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from alignpipe import models, reports
from alignpipe.config import flatten, option
from alignpipe.data.build import read_stage_split, split_uri
from alignpipe.errors import ConfigError, DataError
from alignpipe.models import PeftOptions
from alignpipe.tracking import NullTracker, Tracker
from alignpipe.training import (
    ModelStageOptions,
    TrainResult,
    checkpoint_callbacks,
    checkpoint_step,
    local_output,
    quiet_printing,
    resume_checkpoint,
    tracker_callback,
    train_from,
    trainer_arguments,
)

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
# losses that read (anchor, positive[, negative]) rows, and those that read scored pairs
IN_BATCH_LOSSES = ("mnrl", "cached_mnrl")
SIMILARITY_LOSSES = ("cosent", "cosine")


@dataclass
class ContrastiveStageConfig(ModelStageOptions):
    """Contrastive fine-tuning of a text encoder on pairs (sentence-transformers).

    With ``peft.method=lora`` (the default) an adapter on the backbone trains and is merged into
    the saved encoder; ``none`` trains every weight (needed for a tiny model built from scratch).
    """

    stage: ClassVar[str] = "contrastive"

    loss: Literal["auto", "mnrl", "cached_mnrl", "cosent", "cosine"] = option(
        "auto",
        help="mnrl: in-batch negatives plus the row's hard negative (MultipleNegativesRanking"
        "Loss); cached_mnrl: the same with GradCache, so training.batch_size can be far larger "
        "than fits in memory; cosent or cosine: regress the cosine similarity on the pair's "
        "score (CoSENT ranks pairs, cosine fits the value); auto: cosent when every training "
        "pair has a score, else mnrl.",
    )
    pooling: Literal["mean", "lasttoken", "cls", "max"] = option(
        "mean",
        help="How token states become one vector, for a backbone that is not already a "
        "sentence-transformers model (whose own pooling is kept).",
    )
    max_length: int = option(128, help="Longest text in tokens; longer texts are cut.")
    mini_batch_size: int = option(
        32, help="cached_mnrl: texts per forward pass; memory scales with this, not the batch."
    )
    scale: float = option(
        20.0, help="Inverse temperature of the in-batch and CoSENT losses (cosine x scale)."
    )
    score_scale: float = option(
        5.0, help="Largest possible score (5 for STS); scores are divided by it into [0, 1]."
    )
    positive_threshold: float = option(
        0.8,
        help="A scored pair with score / score_scale at least this counts as a positive pair: "
        "for mnrl on scored data, and for the held-out retrieval metrics.",
    )
    max_eval_pairs: int | None = option(
        1000, help="Held-out pairs used for the metrics (the first ones); unset = all."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft.method == "prompt_tuning":
            raise ConfigError(
                "contrastive trains an encoder, where soft prompt tokens would be pooled into "
                "the embedding; set peft.method=lora or peft.method=none"
            )
        if self.save_adapter_only:
            raise ConfigError(
                "contrastive saves the encoder with any LoRA adapter merged, so that "
                "sentence-transformers loads it as is; set save_adapter_only=false"
            )
        for name, least in (("max_length", 2), ("mini_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an integer of at least {least}, got {value!r}")
        if self.max_eval_pairs is not None and self.max_eval_pairs < 2:
            raise ConfigError(
                f"max_eval_pairs must be at least 2 (or unset for all), got {self.max_eval_pairs}"
            )
        if self.training.batch_size < 2:
            raise ConfigError(
                "contrastive losses compare the examples of a batch with each other; set "
                "training.batch_size to 2 or more (in-batch negatives gain from large batches)"
            )
        if self.loss == "cached_mnrl" and self.mini_batch_size > self.training.batch_size:
            raise ConfigError(
                f"mini_batch_size={self.mini_batch_size} is larger than training.batch_size="
                f"{self.training.batch_size}, so cached_mnrl saves nothing; lower "
                "mini_batch_size, or raise training.batch_size"
            )
        if self.scale <= 0 or self.score_scale <= 0:
            raise ConfigError(
                f"scale and score_scale must be positive, got {self.scale} and {self.score_scale}"
            )
        if not 0.0 < self.positive_threshold <= 1.0:
            raise ConfigError(
                f"positive_threshold must be in (0, 1], got {self.positive_threshold}; "
                "0.8 takes STS pairs scored 4 of 5 and above"
            )


def run(
    config: ContrastiveStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> TrainResult:
    """Fine-tune ``config.model`` as an encoder on a data folder and save it under ``output``.

    Writes ``output/model`` (a sentence-transformers folder, safetensors), ``output/checkpoints``
    (a rerun resumes from the newest) and ``output/metrics.json``.

    Args:
        config: The stage config.
        data: A folder (local or ``s3://``) with ``train.parquet`` and ``eval.parquet`` of text
            pairs (the prep stage's output) or preference pairs (the ingest stage's output).
        output: A local folder.
        tracker: Where params and metrics go; a :class:`NullTracker` when None.

    Returns:
        The encoder folder and the metrics: ``eval_spearman``, ``eval_accuracy_at_1`` and
        ``eval_mrr`` (those the held-out pairs allow), each also as ``*_initial`` for the
        untrained encoder, plus ``train_loss``, ``train_pairs``, ``train_seconds``.

    Raises:
        ConfigError: The output is not local, or sentence-transformers is not installed.
        DataError: A split is missing or empty, holds conversations, or lacks what the loss
            needs (scores for cosent and cosine, positive pairs for mnrl).
        ModelError: The model cannot be resolved or loaded.
    """
    _check_installed()
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = local_output(output, "contrastive")

    # data: every record becomes anchor/positive/negative/score; the loss decides the columns
    train_rows, eval_rows = (load_text_pairs(data, split, tracker) for split in ("train", "eval"))
    loss = resolve_loss(config.loss, train_rows)
    train_set = training_set(train_rows, loss, config)

    # the encoder, and where it stands before training
    encoder = load_encoder(config)
    initial = evaluate_encoder(encoder, eval_rows, config)
    tracker.log_metrics(initial, step=0)
    trainer = build_trainer(config, encoder, train_set, loss, out, tracker)

    # train
    resume = resume_checkpoint(out, config.training, ranks=trainer.args)
    log.info("training %d steps with %s (before: %s)", config.training.max_steps, loss, initial)
    started = time.monotonic()
    train_from(trainer, resume)
    seconds = time.monotonic() - started
    final = evaluate_encoder(encoder, eval_rows, config)

    # log
    metrics = _metrics(trainer, initial, final, seconds, resume, _num_rows(train_set))
    tracker.log_metrics(metrics, step=trainer.state.global_step)
    tracker.log_dict(metrics, METRICS_FILE)
    tracker.set_tags({"alignpipe.contrastive_loss": loss})
    if resume:
        tracker.set_tags({"alignpipe.resumed_from": resume})
    log.info("held-out %s -> %s in %.1f s", initial, final, seconds)

    # save
    model_dir = save_encoder(encoder, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


def _check_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(
            "the contrastive stage needs sentence-transformers, an optional dependency; "
            "install it with pip install 'alignpipe[contrastive]'"
        )


# ---------------------------------------------------------------------------------------------
# data


def load_text_pairs(data: str, split: str, tracker: Tracker | None = None) -> list[dict]:
    """Read one split as ``anchor``/``positive``/``negative``/``score`` rows.

    Text pairs are taken as they are. A preference pair becomes a triplet: its prompt (every
    turn's text, one per line) is the anchor, the chosen answer the positive and the rejected
    one the hard negative, so the encoder learns to put the preferred answer closer to its prompt.

    Raises:
        DataError: The split is missing or empty, or holds records of another shape.
    """
    records, digest = read_stage_split(
        data,
        split,
        "give contrastive the output folder of the prep stage (text pairs) or of the ingest "
        "stage (preference pairs)",
    )
    if not records:
        raise DataError(
            f"the {split} split of {data} is empty; contrastive needs both splits (re-run prep "
            "with more data, or with eval_fraction > 0 for the eval split)"
        )
    first = records[0]
    if "anchor" in first:
        kind, rows = "text-pair", [_text_pair(r) for r in records]
    elif "chosen" in first:
        kind, rows = "preference", [preference_triplet(r) for r in records]
    else:
        raise DataError(
            f"{data}/{split}.parquet holds {', '.join(first)} records, not text or preference "
            "pairs; conversations train with sft, not contrastive"
        )
    log.info("%d %s %s rows from %s", len(rows), split, kind, data)
    if tracker is not None:
        uri = split_uri(data, split)
        tracker.log_dataset(f"{kind}-{split}", uri, digest, split, len(rows))
    return rows


def preference_triplet(record: dict) -> dict:
    """A preference pair as an (anchor, positive, negative) triplet of plain texts."""

    def text(messages: list[dict]) -> str:
        return "\n".join(m["content"] for m in messages)

    return {
        "anchor": text(record["prompt"]),
        "positive": text(record["chosen"]),
        "negative": text(record["rejected"]),
        "score": None,
    }


def _text_pair(record: dict) -> dict:
    return {k: record.get(k) for k in ("anchor", "positive", "negative", "score")}


def resolve_loss(loss: str, rows: list[dict]) -> str:
    """The loss ``auto`` stands for: a similarity loss when every row is scored."""
    if loss != "auto":
        return loss
    return "cosent" if all(r["score"] is not None for r in rows) else "mnrl"


def training_set(rows: list[dict], loss: str, config: ContrastiveStageConfig) -> Any:
    """The training rows in the column order the loss reads (sentence-transformers is positional).

    Similarity losses get ``(sentence1, sentence2, score in [0, 1])``. In-batch losses get
    ``(anchor, positive)`` pairs and ``(anchor, positive, negative)`` triplets; scored rows count
    as pairs when their score reaches ``positive_threshold``. When both pairs and triplets exist
    they train as two datasets under the same loss, so no row's hard negative is dropped.

    Raises:
        DataError: Scores are missing or out of range for a similarity loss, or no positive
            pairs are left for an in-batch loss.
    """
    from datasets import Dataset, DatasetDict

    if loss in SIMILARITY_LOSSES:
        unscored = sum(r["score"] is None for r in rows)
        if unscored:
            raise DataError(
                f"loss={loss} regresses on scores, but {unscored} of {len(rows)} training pairs "
                "have none; use loss=mnrl for unscored pairs"
            )
        scores = [_scaled(r["score"], config.score_scale) for r in rows]
        return Dataset.from_dict(
            {
                "sentence1": [r["anchor"] for r in rows],
                "sentence2": [r["positive"] for r in rows],
                "score": scores,
            }
        )

    usable = [r for r in rows if _is_positive(r, config)]
    if len(usable) < len(rows):
        log.info(
            "%d of %d scored pairs are below positive_threshold=%s and do not train with %s",
            len(rows) - len(usable),
            len(rows),
            config.positive_threshold,
            loss,
        )
    if len(usable) < 2:
        raise DataError(
            f"loss={loss} needs at least 2 positive pairs, found {len(usable)}; lower "
            "positive_threshold, or use loss=cosent for scored pairs"
        )
    triplets = [r for r in usable if r["negative"] is not None]
    pairs = [r for r in usable if r["negative"] is None]
    sets = {}
    if triplets:
        sets["triplets"] = Dataset.from_dict(
            {key: [r[key] for r in triplets] for key in ("anchor", "positive", "negative")}
        )
    if pairs:
        sets["pairs"] = Dataset.from_dict(
            {key: [r[key] for r in pairs] for key in ("anchor", "positive")}
        )
    return next(iter(sets.values())) if len(sets) == 1 else DatasetDict(sets)


def _scaled(score: float, scale: float) -> float:
    value = score / scale
    if not 0.0 <= value <= 1.0:
        raise DataError(
            f"score {score} is outside [0, score_scale={scale}]; set score_scale to the "
            "largest score of your data (5 for STS, 1 for scores in [0, 1])"
        )
    return value


def _is_positive(row: dict, config: ContrastiveStageConfig) -> bool:
    score = row["score"]
    return score is None or _scaled(score, config.score_scale) >= config.positive_threshold


def _num_rows(train_set: Any) -> int:
    from datasets import DatasetDict

    if isinstance(train_set, DatasetDict):
        return sum(len(part) for part in train_set.values())
    return len(train_set)


# ---------------------------------------------------------------------------------------------
# encoder


def load_encoder(config: ContrastiveStageConfig) -> SentenceTransformer:
    """Load a sentence-transformers model as it is, or a backbone with a pooling layer on top.

    A causal LM (a tiny model, an SFT output) loads as its bare transformer, without the LM
    head. With ``peft.method=lora`` the backbone gets a trainable LoRA adapter.

    Raises:
        ModelError: The model cannot be resolved or loaded.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from sentence_transformers.util.file_io import is_sentence_transformer_model
    from transformers import set_seed

    path = models.resolve_model(config.model)
    model_kwargs: dict[str, Any] = {"use_safetensors": True}
    if config.dtype != "auto":
        import torch

        model_kwargs["dtype"] = getattr(torch, config.dtype)
    if is_sentence_transformer_model(path):
        encoder = SentenceTransformer(
            path, trust_remote_code=config.trust_remote_code, model_kwargs=model_kwargs
        )
        encoder.max_seq_length = config.max_length
    else:
        backbone = Transformer(
            path,
            model_kwargs={**model_kwargs, "trust_remote_code": config.trust_remote_code},
            config_kwargs={"trust_remote_code": config.trust_remote_code},
            processor_kwargs={"trust_remote_code": config.trust_remote_code},
            max_seq_length=config.max_length,
        )
        pooling = Pooling(backbone.get_embedding_dimension(), config.pooling)
        encoder = SentenceTransformer(modules=[backbone, pooling])
    if config.peft.method == "lora":
        # LoRA's A matrices are random: seed them like the rest of the run
        set_seed(config.training.seed)
        _attach_lora(encoder, config.peft)
    log.info("loaded %s as a %d-dim encoder", config.model, encoder.get_embedding_dimension())
    return encoder


def _attach_lora(encoder: SentenceTransformer, options: PeftOptions) -> None:
    from peft import get_peft_model

    backbone = encoder[0]
    peft_config = models.peft_config(backbone.model, options)
    # the backbone is a feature extractor here; there is no LM head for peft to wrap
    peft_config.task_type = "FEATURE_EXTRACTION"
    backbone.model = get_peft_model(backbone.model, peft_config)


def save_encoder(encoder: SentenceTransformer, output: Path) -> str:
    """Save the encoder as a sentence-transformers folder (safetensors), any adapter merged."""
    from peft import PeftModel

    backbone = encoder[0]
    if isinstance(backbone.model, PeftModel):
        backbone.model = backbone.model.merge_and_unload()
    dest = output / models.STAGE_MODEL_DIR
    encoder.save(str(dest), safe_serialization=True, create_model_card=False)
    log.info("saved the encoder to %s", dest)
    return str(dest)


def _trainer_class() -> type:
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformerTrainer

    class Trainer(SentenceTransformerTrainer):
        """Resumes a LoRA run too.

        A LoRA backbone is a ``PeftModel`` whose checkpoints hold the adapter alone; the parent
        class reloads a checkpoint as transformers' own adapter integration, whose weight names
        differ, so the adapter weights are put back here. The optimizer, scheduler and RNG
        states resume as usual. sentence-transformers' own ``add_adapter`` would avoid this,
        but transformers 5 allows it only from peft 0.22 on; this can go once peft is pinned
        at 0.22 or later and the stage attaches LoRA that way.
        """

        def _load_from_checkpoint(self, checkpoint: str) -> None:
            backbone = self.model[0].model
            if not isinstance(backbone, PeftModel):
                return super()._load_from_checkpoint(checkpoint)
            weights = load_file(Path(checkpoint) / "adapter_model.safetensors")
            set_peft_model_state_dict(backbone, weights)

    return Trainer


def build_trainer(
    config: ContrastiveStageConfig,
    encoder: SentenceTransformer,
    train_set: Dataset | DatasetDict,
    loss: str,
    output: str | Path,
    tracker: Tracker | None = None,
) -> SentenceTransformerTrainer:
    """The ``SentenceTransformerTrainer`` that :func:`run` trains with."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import losses

    objectives = {
        "mnrl": lambda: losses.MultipleNegativesRankingLoss(encoder, scale=config.scale),
        "cached_mnrl": lambda: losses.CachedMultipleNegativesRankingLoss(
            encoder, scale=config.scale, mini_batch_size=config.mini_batch_size
        ),
        "cosent": lambda: losses.CoSENTLoss(encoder, scale=config.scale),
        "cosine": lambda: losses.CosineSimilarityLoss(encoder),
    }
    args = SentenceTransformerTrainingArguments(
        **trainer_arguments(config.training, output),
        # a duplicate text in a batch would be an in-batch "negative" equal to the positive
        batch_sampler=(
            BatchSamplers.NO_DUPLICATES if loss in IN_BATCH_LOSSES else BatchSamplers.BATCH_SAMPLER
        ),
    )
    trainer = _trainer_class()(
        model=encoder,
        args=args,
        train_dataset=train_set,
        loss=objectives[loss](),
        callbacks=[
            tracker_callback(tracker or NullTracker()),
            *checkpoint_callbacks(config.training),
        ],
    )
    return quiet_printing(trainer)


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_encoder(
    encoder: SentenceTransformer, rows: list[dict], config: ContrastiveStageConfig
) -> dict[str, float]:
    """Held-out metrics: Spearman on scored pairs, accuracy@1 and MRR on positive pairs.

    Retrieval ranks every held-out positive and hard negative for each anchor; the anchor's own
    positive is the one right answer.

    Raises:
        DataError: The rows allow neither metric (fewer than 2 scored or positive pairs).
    """
    rows = rows[: config.max_eval_pairs] if config.max_eval_pairs else rows
    metrics = {}
    scored = [r for r in rows if r["score"] is not None]
    if len(scored) >= 2:
        anchors = _embed(encoder, [r["anchor"] for r in scored])
        positives = _embed(encoder, [r["positive"] for r in scored])
        cosines = (anchors * positives).sum(dim=1).tolist()
        metrics["eval_spearman"] = spearman(cosines, [r["score"] for r in scored])
    positive = [r for r in rows if _is_positive(r, config)]
    if len(positive) >= 2:
        texts = (t for r in positive for t in (r["positive"], r["negative"]) if t is not None)
        corpus = list(dict.fromkeys(texts))  # unique, in order
        targets = [corpus.index(r["positive"]) for r in positive]
        queries = _embed(encoder, [r["anchor"] for r in positive])
        metrics.update(retrieval_metrics(queries @ _embed(encoder, corpus).T, targets))
    if not metrics:
        raise DataError(
            f"the eval split has {len(scored)} scored and {len(positive)} positive pairs; "
            "contrastive needs 2 of either for held-out metrics (raise eval_fraction in prep)"
        )
    return metrics


def _embed(encoder: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    return encoder.encode(
        texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True
    ).cpu()


def spearman(predicted: list[float], gold: list[float]) -> float:
    """Spearman rank correlation; 0.0 when either side is constant (no ranking to compare)."""
    from scipy.stats import spearmanr

    value = float(spearmanr(predicted, gold).statistic)
    return 0.0 if math.isnan(value) else value


def retrieval_metrics(similarity: torch.Tensor, targets: list[int]) -> dict[str, float]:
    """Accuracy@1 and mean reciprocal rank of each query's target in a similarity matrix.

    Args:
        similarity: ``[queries, corpus]`` scores, higher = closer.
        targets: For each query, the corpus index of its one right answer.

    A tie with the target counts against it: an encoder that maps everything to one vector
    ranks every target last, not first.
    """
    import torch

    target = torch.tensor(targets)
    hit = similarity[torch.arange(len(targets)), target].unsqueeze(1)
    others = torch.ones_like(similarity, dtype=torch.bool)
    others[torch.arange(len(targets)), target] = False
    # [queries]: 1 + how many other texts score at least as high as the right answer
    rank = 1 + ((similarity >= hit) & others).sum(dim=1)
    return {
        "eval_accuracy_at_1": (rank == 1).float().mean().item(),
        "eval_mrr": (1.0 / rank.float()).mean().item(),
    }


def _metrics(
    trainer: SentenceTransformerTrainer,
    initial: dict[str, float],
    final: dict[str, float],
    seconds: float,
    resume: str | None,
    train_pairs: int,
) -> dict[str, float]:
    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    metrics = {
        **final,
        **{f"{key}_initial": value for key, value in initial.items()},
        "train_pairs": float(train_pairs),
        "train_seconds": seconds,
        "global_step": float(state.global_step),
    }
    if losses:
        metrics["train_loss"] = losses[-1]
    if resume:
        metrics["resumed_from_step"] = float(checkpoint_step(resume))
    return metrics


# -- report --------------------------------------------------------------------------------------

HELD_OUT_METRICS = (
    ("eval_spearman", "Spearman correlation (scored pairs)"),
    ("eval_accuracy_at_1", "retrieval accuracy@1"),
    ("eval_mrr", "retrieval MRR"),
)


def write_report(metrics: Mapping[str, float], output: str | Path) -> Path:
    """Write ``report.md`` and ``report.html``: the held-out metrics of the untrained and the
    trained encoder, side by side; return ``report.md``.

    Raises:
        DataError: ``metrics`` holds none of the held-out metrics of the contrastive stage.
    """
    rows = []
    for key, label in HELD_OUT_METRICS:
        if key in metrics:
            before, after = metrics[f"{key}_initial"], metrics[key]
            rows.append((label, f"{before:.4g}", f"{after:.4g}", f"{after - before:+.4g}"))
    if not rows:
        raise DataError(
            "the metrics hold no eval_spearman, eval_accuracy_at_1 or eval_mrr; pass the "
            "contrastive stage's metrics"
        )
    header = ("held-out metric", "untrained encoder", "trained encoder", "change")
    return reports.write_table("Contrastive evaluation: held-out pairs", header, rows, output)
