"""What every training stage shares: the options of a run, the device, checkpoints, logging.

SFT, DPO and the reward model each wrap a TRL trainer. They build its config from
:class:`TrainingOptions` through :func:`trainer_arguments`, find the checkpoint to resume from
with :func:`resume_checkpoint`, and report to the stage's tracker through :class:`TrackerCallback`,
so that these concerns are written once and cannot drift apart between stages. With
``training.checkpoint_uri`` set, :class:`CheckpointStore` keeps copies of the checkpoints in the
artifact store (for TRL stages through :func:`checkpoint_callbacks`, for PPO from its own save
function), so that a retried cluster pod, which starts with an empty output folder, resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal

from alignpipe import storage
from alignpipe.config import option
from alignpipe.errors import ConfigError, StorageError
from alignpipe.models import DTYPES, PeftOptions

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The object written last into a checkpoint's copy in the store: the list of its files.
UPLOAD_MARKER = "upload-complete.json"
# A checkpoint folder of any stage: checkpoint-N (TRL), iter-N (PPO).
_STORED_CHECKPOINT = re.compile(r"^[A-Za-z_]+-(\d+)$")


@dataclass
class TrainingOptions:
    """The optimisation loop shared by every training stage."""

    max_steps: int = option(200, help="Optimizer steps to train for.")
    learning_rate: float = option(5e-4, help="Peak learning rate.")
    batch_size: int = option(16, help="Examples per device per forward pass.")
    gradient_accumulation_steps: int = option(
        1, help="Forward passes per optimizer step; the effective batch is their product."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", help="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = option(0.0, help="Share of steps spent warming up the learning rate.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float = option(1.0, help="Clip gradients to this global norm.")
    logging_steps: int = option(10, help="Log training metrics every this many steps.")
    eval_steps: int | None = option(
        None, help="Evaluate every this many steps; unset = only at the end."
    )
    save_steps: int = option(50, help="Write a checkpoint every this many steps (for resume).")
    save_total_limit: int = option(2, help="Keep at most this many checkpoints.")
    checkpoint_uri: str | None = option(
        None,
        help="Also keep each complete checkpoint here (an s3:// prefix or a folder), pruned to "
        "save_total_limit; a run whose output holds no checkpoint resumes from the newest one "
        "here, as a retried cluster pod must. Unset = checkpoints in the output only.",
    )
    seed: int = option(0, help="Seed of initialisation, shuffling and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", help="Numeric precision; auto = bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool = option(
        False, help="Trade compute for memory; worth it for large models only."
    )
    num_threads: int | None = option(None, help="CPU threads for torch; unset = torch's default.")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.checkpoint_uri is not None:
            uri = self.checkpoint_uri
            if not uri.strip() or ("://" in uri and not storage.is_s3(uri)):
                raise ConfigError(
                    f"training.checkpoint_uri must be an s3://bucket/prefix or a local folder, "
                    f"got {uri!r}; leave it unset to keep checkpoints in the output only"
                )
            if storage.is_s3(uri) and not uri[len(storage.S3_SCHEME) :].strip("/"):
                raise ConfigError(
                    f"training.checkpoint_uri {uri!r} names no bucket; write it as "
                    "s3://bucket/prefix"
                )


@dataclass
class ModelStageOptions:
    """What every training stage shares: the model it starts from and how it is adapted.

    A stage config inherits these fields and calls ``super().__post_init__()`` before its own
    checks; ``stage`` names it in messages.
    """

    stage: ClassVar[str] = "this stage"

    model: str | None = option(
        None,
        help="The model to start from (required): a hub id, a local folder, an s3:// prefix, "
        "or a training stage's output folder.",
    )
    peft: PeftOptions = option(
        default_factory=PeftOptions,
        help="Adapter to train: lora (default), prompt_tuning, or none for full fine-tuning "
        "(needed for a tiny model trained from scratch).",
    )
    training: TrainingOptions = option(
        default_factory=TrainingOptions, help="Optimisation loop: steps, batch, learning rate."
    )
    save_adapter_only: bool = option(
        False,
        help="Save only the adapter (with the base model reference) instead of a merged "
        "full model; needs peft.method lora or prompt_tuning.",
    )
    dtype: str = option(
        "auto", help="dtype the weights are loaded in: auto, float32, bfloat16 or float16."
    )
    trust_remote_code: bool = option(
        False, help="Run model code shipped with the model; only for models you trust."
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(
                f"{self.stage} needs a model to start from: set model=<hub id, local folder or "
                "s3:// URI>, e.g. a training stage's output folder"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.save_adapter_only and self.peft.method == "none":
            raise ConfigError(
                "save_adapter_only=true needs an adapter; set peft.method=lora, or "
                "save_adapter_only=false to save the fully fine-tuned model"
            )
        if self.peft.method == "prompt_tuning" and not self.save_adapter_only:
            raise ConfigError(
                "a prompt-tuning adapter cannot be merged into the weights; set "
                "save_adapter_only=true, or use peft.method=lora"
            )


@dataclass
class TrainResult:
    """What a training stage returns: where its model is, its final metrics, its resume point."""

    model_dir: str
    metrics: dict[str, float]
    resumed_from: str | None = None


def resolve_precision(precision: str) -> tuple[bool, bool]:
    """Return ``(bf16, fp16)`` flags for the device at hand; fail early on impossible asks."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        return (cuda and torch.cuda.is_bf16_supported(), False)
    if precision == "fp16" and not cuda:
        raise ConfigError("precision=fp16 needs a CUDA device; use precision=fp32 on a CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use precision=fp16 or fp32")
    return (precision == "bf16", precision == "fp16")


def trainer_arguments(options: TrainingOptions, output_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments for a TRL config (SFTConfig, DPOConfig, RewardConfig).

    TRL defaults to bf16 and gradient checkpointing, which fail or crawl on a CPU; both are set
    here from the options and the device rather than left to the defaults.
    """
    bf16, fp16 = resolve_precision(options.precision)
    if options.num_threads is not None:
        import torch

        torch.set_num_threads(options.num_threads)
    return {
        "output_dir": str(Path(output_dir) / CHECKPOINT_DIR),
        "max_steps": options.max_steps,
        "learning_rate": options.learning_rate,
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "lr_scheduler_type": options.lr_scheduler,
        # transformers 5 dropped warmup_ratio; a warmup_steps value below 1 is read as a ratio
        "warmup_steps": options.warmup_ratio,
        "weight_decay": options.weight_decay,
        "max_grad_norm": options.max_grad_norm,
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if options.eval_steps else "no",
        "eval_steps": options.eval_steps,
        "save_strategy": "steps",
        "save_steps": options.save_steps,
        "save_total_limit": options.save_total_limit,
        "seed": options.seed,
        "data_seed": options.seed,
        "bf16": bf16,
        "fp16": fp16,
        # transformers 5 renamed gradient_checkpointing; the old name, which TRL's configs still
        # default to True, follows the new one when both are given (and warns when only it is)
        "activation_checkpointing": options.gradient_checkpointing,
        "report_to": "none",
        "disable_tqdm": not _interactive(),
        "dataloader_num_workers": 0,
        "use_cpu": not _cuda(),
    }


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        # the trainer state is written last; a checkpoint without it was interrupted mid-save
        if match and (child / "trainer_state.json").exists():
            found.append((int(match.group(1)), child))
    if not found:
        return None
    step, path = max(found)
    log.info("resuming from checkpoint at step %d: %s", step, path)
    return str(path)


def resume_checkpoint(
    output_dir: str | Path,
    options: TrainingOptions,
    find: Callable[[Path], str | None] = last_checkpoint,
    ranks: Any = None,
) -> str | None:
    """The checkpoint a run resumes from: the newest in the output, else the newest stored.

    With ``options.checkpoint_uri`` set and no checkpoint in the output (a retried pod starts
    with an empty output folder), the newest complete checkpoint in the store is downloaded
    into ``output_dir/checkpoints`` first. The store is listed even when the output has a
    checkpoint, so that a wrong bucket or missing credentials fail before training, not at its
    first save.

    Args:
        output_dir: The stage's local output folder.
        options: The run's training options.
        find: The stage's finder of the newest complete local checkpoint (the TRL stages'
            :func:`last_checkpoint` by default; PPO has its own).
        ranks: The trainer's ``TrainingArguments`` when the stage may run on several ranks:
            then each node's main process looks (and downloads) first, and the node's other
            ranks wait for it and find its copy, rather than all downloading into one folder.

    Raises:
        StorageError: The store cannot be read, or a download failed.
    """
    output = Path(output_dir)
    first = (
        ranks.main_process_first(local=True, desc="checkpoint lookup")
        if ranks is not None
        else contextlib.nullcontext()
    )
    with first:
        store = checkpoint_store(options)
        stored = store.complete() if store is not None else []
        local = find(output)
        if local is not None or store is None or not stored:
            return local
        store.download(stored[-1][1], output / CHECKPOINT_DIR)
        return find(output)


def train_from(trainer: Any, resume: str | None) -> float | None:
    """Train with ``trainer`` from ``resume`` (or from the start); the mean loss of the steps run.

    A checkpoint already at ``max_steps`` (the pod was killed after its last save) is loaded,
    not trained from: transformers' loop takes a step before it checks ``max_steps``, so
    resuming from the last checkpoint would train one step more than asked. Then no step runs
    and the mean loss is None.
    """
    if resume is None or checkpoint_step(resume) < trainer.args.max_steps:
        return trainer.train(resume_from_checkpoint=resume).training_loss
    from transformers import TrainerState

    log.info(
        "the checkpoint is at max_steps (%d): loading it, no step left to train",
        trainer.args.max_steps,
    )
    trainer._load_from_checkpoint(resume)  # what train() does with a checkpoint to resume from
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    return None


def checkpoint_store(options: TrainingOptions) -> CheckpointStore | None:
    """The store of ``options.checkpoint_uri``, pruned to ``save_total_limit``; None if unset."""
    if options.checkpoint_uri is None:
        return None
    return CheckpointStore(options.checkpoint_uri, options.save_total_limit)


def checkpoint_callbacks(options: TrainingOptions) -> list[Any]:
    """Trainer callbacks that copy each saved checkpoint to the store ([] without a store).

    The trainer calls ``on_save`` once the checkpoint folder is complete (trainer state
    written, older local checkpoints rotated out).
    """
    store = checkpoint_store(options)
    if store is None:
        return []
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class StoreCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                store.upload(folder)

    return [StoreCheckpoints()]


def run_checkpoint_uri(root: str, kfp_run_id: str | None, stage: str) -> str:
    """Where a pipeline run's stage keeps its checkpoints: ``ROOT/RUN_ID/STAGE``.

    Keyed by the KFP run id, which a retried task keeps, so the retry finds its checkpoints and
    another run does not.

    Raises:
        ConfigError: The run id is missing.
    """
    if not kfp_run_id:
        raise ConfigError(
            f"{stage}: checkpoint_root needs the KFP run id; pass "
            "kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER to the component, or unset checkpoint_root"
        )
    return f"{root.rstrip('/')}/{kfp_run_id}/{stage}"


class CheckpointStore:
    """Copies of a stage's checkpoint folders under an ``s3://`` prefix or a local folder.

    A checkpoint ``NAME-STEP`` (``checkpoint-20``, ``iter-4``) is stored as ``URI/NAME-STEP/...``.
    Its files go up first and the marker object ``upload-complete.json``, which lists them, goes
    last: a copy without the marker (an upload cut short by a killed pod) is never downloaded,
    and a download fetches exactly the listed files. Pruning removes the marker first for the
    same reason. One pod writes a store at a time (KFP retries a task only after it failed).
    """

    def __init__(self, uri: str, keep: int) -> None:
        """Open a store; nothing is read or written until it is used.

        Args:
            uri: An ``s3://`` prefix or a local folder.
            keep: How many complete copies pruning keeps (``save_total_limit``); <= 0 keeps all.
        """
        self.uri = uri.rstrip("/")
        self.keep = keep

    def upload(self, folder: Path) -> str:
        """Copy a complete local checkpoint folder to the store, then prune older copies.

        Returns:
            The URI of the copy.

        Raises:
            StorageError: The folder's name has no step, or the upload failed.
        """
        step = _stored_step(folder.name)
        if step is None:
            raise StorageError(f"{folder}: not a checkpoint folder (NAME-STEP, e.g. checkpoint-20)")
        remote = f"{self.uri}/{folder.name}"
        marker = f"{remote}/{UPLOAD_MARKER}"
        # a copy left by an earlier attempt is incomplete from the moment it is overwritten
        storage.delete(marker)
        files = sorted(item for item in folder.rglob("*") if item.is_file())
        storage.upload(folder, remote)
        listed = {item.relative_to(folder).as_posix(): item.stat().st_size for item in files}
        storage.write_text(marker, json.dumps({"step": step, "files": listed}, indent=1) + "\n")
        log.info("stored the checkpoint of step %d at %s", step, remote)
        self.prune(step)
        return remote

    def complete(self) -> list[tuple[int, str]]:
        """``(step, name)`` of every complete copy in the store, oldest first."""
        return sorted((step, name) for name, (step, done) in self._listing().items() if done)

    def download(self, name: str, checkpoints: Path) -> Path:
        """Fetch the complete copy ``name`` into ``checkpoints/name``, replacing what is there.

        The files land in a staging folder that is renamed into place at the end, so a killed
        download never looks like a checkpoint to resume from.

        Raises:
            StorageError: The copy has no marker, a file is missing or of the wrong size, or a
                download failed (checksums are verified by :mod:`alignpipe.storage`).
        """
        remote = f"{self.uri}/{name}"
        manifest = json.loads(storage.read_text(f"{remote}/{UPLOAD_MARKER}"))
        staging = checkpoints / f".download-{name}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            for relative, size in manifest["files"].items():
                parts = PurePosixPath(relative).parts
                if PurePosixPath(relative).is_absolute() or ".." in parts:
                    raise StorageError(
                        f"{remote}/{UPLOAD_MARKER}: lists {relative!r}, outside the checkpoint "
                        "(delete this stored checkpoint)"
                    )
                target = storage.download(f"{remote}/{relative}", staging.joinpath(*parts))
                if target.stat().st_size != size:
                    raise StorageError(
                        f"{remote}/{relative}: {target.stat().st_size} bytes, the marker lists "
                        f"{size} (the stored checkpoint changed during the download; retry)"
                    )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        dest = checkpoints / name
        if dest.exists():  # an incomplete local checkpoint, left by a killed save
            shutil.rmtree(dest)
        staging.rename(dest)
        log.info(
            "downloaded the checkpoint of step %d from %s to %s", manifest["step"], remote, dest
        )
        return dest

    def prune(self, newest: int) -> None:
        """Delete complete copies beyond the newest ``keep``, and incomplete ones before ``newest``.

        An incomplete copy older than the checkpoint just stored is the remains of a killed
        upload; one newer than it is left alone.
        """
        if self.keep <= 0:
            return
        listing = self._listing()
        done = sorted((step, name) for name, (step, complete) in listing.items() if complete)
        stale = {name for _, name in done[: -self.keep]}
        stale |= {
            name for name, (step, complete) in listing.items() if not complete and step < newest
        }
        for name in sorted(stale, key=lambda item: listing[item][0]):
            storage.delete(f"{self.uri}/{name}/{UPLOAD_MARKER}")
            storage.delete(f"{self.uri}/{name}")
            log.info("pruned the stored checkpoint %s/%s", self.uri, name)

    def _listing(self) -> dict[str, tuple[int, bool]]:
        """Every checkpoint folder in the store: name -> (step, has its marker)."""
        found: dict[str, tuple[int, bool]] = {}
        for relative in storage.list_relative(self.uri):
            name, _, rest = relative.partition("/")
            step = _stored_step(name)
            if step is not None and rest:
                found[name] = (step, found.get(name, (step, False))[1] or rest == UPLOAD_MARKER)
        return found


def _stored_step(name: str) -> int | None:
    match = _STORED_CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def tracker_callback(tracker: Any, prefix: str = "") -> Any:
    """A transformers callback sending the trainer's logs to ``tracker`` with their step.

    Outside a terminal it also writes one log line per logging step (the pod-log view of
    training); in a terminal the trainer's progress bar does that job.
    """
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {
                f"{prefix}{k}": float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if numeric:
                tracker.log_metrics(numeric, step=state.global_step)
                if not _interactive():
                    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(numeric.items()))
                    log.info("step %d/%d %s", state.global_step, state.max_steps, shown)

    return TrackerCallback()


def quiet_printing(trainer: Any) -> Any:
    """Drop the trainer's stdout printer of log dicts; :func:`tracker_callback` logs instead.

    transformers prints every log dict to stdout when the progress bar is off, which would
    interleave with a CLI's own output.
    """
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run logs a large number instead of inf."""
    return math.exp(min(loss, 50.0))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _interactive() -> bool:
    return os.isatty(2) and "KFP_POD_NAME" not in os.environ


def local_output(output: str, stage: str) -> Path:
    """The stage's output folder, created; training stages write locally (checkpoints)."""
    if "://" in output:
        raise ConfigError(
            f"{stage} writes to a local folder, got {output!r}; give a local --output (a KFP "
            "component gets one) and upload the model afterwards"
        )
    folder = Path(output).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def checkpoint_step(checkpoint: str) -> int:
    """The step number in a ``checkpoint-N`` folder's name."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def base_ref(ref: str) -> str:
    """Where an adapter's base lives: the URI or hub id as given, a local folder in full."""
    if ref.startswith("s3://"):
        return ref
    from alignpipe import models

    return models.resolve_model(ref)


def save_stage_model(config: ModelStageOptions, model: Any, tokenizer: Any, output: Path) -> str:
    """Save a trained model as ``output/model``: merged weights, or the adapter alone.

    With ``save_adapter_only`` the adapter records its base (:func:`base_ref`), so that the
    folder loads on its own; otherwise a LoRA adapter is merged into a plain model.
    """
    from alignpipe import models

    dest = output / models.STAGE_MODEL_DIR
    adapter = config.peft.method != "none"
    models.save_model(
        model,
        tokenizer,
        str(dest),
        merge_adapter=adapter and not config.save_adapter_only,
        base_ref=base_ref(config.model) if config.save_adapter_only else None,
    )
    saved = "adapter" if config.save_adapter_only else "model"
    log.info("%s: saved the %s to %s", config.stage, saved, dest)
    return str(dest)


def pair_trainer_metrics(
    trainer: Any,
    train_loss: float | None,
    initial: dict[str, float],
    final: dict[str, float],
    seconds: float,
    resume: str | None,
) -> dict[str, float]:
    """The metrics of a stage trained on preference pairs (DPO, the reward model).

    Held-out measures as ``eval_<name>`` and ``eval_<name>_initial``, then the run's cost.
    ``train_loss`` is the mean over the steps this process ran (after a resume: since the
    checkpoint), left out when it ran none.
    """
    state = trainer.state
    metrics = {f"eval_{name}": value for name, value in final.items()}
    metrics.update({f"eval_{name}_initial": value for name, value in initial.items()})
    if train_loss is not None:
        metrics["train_loss"] = float(train_loss)
    metrics.update(
        {
            # non-padding tokens of prompt + chosen and prompt + rejected, over the whole run
            "train_tokens": float(state.num_input_tokens_seen),
            "train_seconds": seconds,
            "global_step": float(state.global_step),
            "resumed_from_step": float(checkpoint_step(resume) if resume else 0),
        }
    )
    return metrics


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def load_preference_pairs(
    data: str,
    split: str,
    stage: str,
    tracker: Any = None,
    extra: tuple[str, ...] = (),
) -> Any:
    """Read one split of an ingest output folder as a ``datasets.Dataset`` of message lists.

    Args:
        data: The ingest stage's output folder (local or ``s3://``).
        split: ``train`` or ``eval``.
        stage: The stage reading it, for messages.
        tracker: Gets the split's fingerprint and row count as a dataset input.
        extra: Optional columns to keep besides ``prompt``/``chosen``/``rejected`` (None where
            a record lacks them), e.g. ``margin``.

    Returns:
        The pairs; None for an empty eval split (the stage then reports no held-out metrics).

    Raises:
        DataError: The split is missing, holds records other than preference pairs, or is
            the train split and empty.
    """
    from datasets import Dataset

    from alignpipe.data.build import read_stage_split, split_uri
    from alignpipe.errors import DataError

    records, digest = read_stage_split(
        data,
        split,
        f"give {stage} the output folder of the ingest stage (alignpipe ingest INPUT --output DIR)",
    )
    if records and not all(field in records[0] for field in PAIR_FIELDS):
        raise DataError(
            f"{data}/{split}.parquet holds {', '.join(records[0])} records, not preference "
            f"pairs; {stage} trains on the ingest stage's output"
        )
    if not records:
        if split == "eval":
            log.warning("%s: the eval split of %s is empty; no held-out metrics", stage, data)
            return None
        raise DataError(f"the train split of {data} is empty; ingest more preference data")
    log.info("%s: %d %s pairs from %s", stage, len(records), split, data)
    if tracker is not None:
        uri = split_uri(data, split)
        tracker.log_dataset(f"preference-{split}", uri, digest, split, len(records))
    fields = (*PAIR_FIELDS, *extra)
    return Dataset.from_list([{k: r.get(k) for k in fields} for r in records])
