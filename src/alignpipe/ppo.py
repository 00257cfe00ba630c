"""PPO stage: optimise a policy against a reward with a KL penalty to its starting model.

TRL no longer ships PPO, so the loop is written here on transformers and peft, in the shape of
Ziegler et al. (2019) and Ouyang et al. (2022): sample responses to prompts, score them, turn the
score and a per-token KL penalty into per-token rewards, estimate advantages with GAE, and take a
few epochs of clipped PPO steps on the batch. The math lives in :mod:`alignpipe.rl`; this module
reads data, holds the models and runs the loop. Checkpoints under ``OUTPUT/checkpoints`` (every
``training.save_steps`` iterations) let a retried run resume where the last one stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from alignpipe import evaluate, models, rl
from alignpipe.config import flatten, option
from alignpipe.data.build import read_stage_split, split_uri
from alignpipe.errors import ConfigError, DataError
from alignpipe.models import PeftOptions
from alignpipe.tracking import NullTracker, Tracker
from alignpipe.training import (
    CHECKPOINT_DIR,
    CheckpointStore,
    ModelStageOptions,
    TrainingOptions,
    TrainResult,
    checkpoint_store,
    resolve_precision,
    resume_checkpoint,
    save_stage_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
METRICS_FILE = "metrics.json"
CHECKPOINT_PREFIX = "iter-"
COMPLETE_MARKER = "COMPLETE"
WITHIN_BOUND_FILE = "within_bound.safetensors"


@dataclass
class PpoStageConfig(ModelStageOptions):
    """PPO of a policy against a reward model or the synthetic task's gold rule (own loop)."""

    stage: ClassVar[str] = "ppo"

    # model, peft and training are the shared options, with what they mean for PPO
    model: str | None = option(
        None,
        help="Policy to start from (required), which is also the KL reference: the sft stage's "
        "output folder, a local folder, a hub id or an s3:// prefix.",
    )
    reward: Literal["reward_model", "gold"] = option(
        "reward_model",
        help="What scores responses: reward_model = the model named by reward_model; gold = the "
        "synthetic task's gold rule (only for its prompts).",
    )
    reward_model: str | None = option(
        None,
        help="Reward model (the reward_model stage's output folder, an s3:// prefix or a hub "
        "id); needed by reward=reward_model and value_head=reward_model.",
    )
    value_head: Literal["policy", "reward_model"] = option(
        "policy",
        help="policy: a linear value head on the policy's last hidden states (shares the trunk; "
        "no second model in memory, but value and policy gradients meet in the adapter); "
        "reward_model: a separate critic initialised from the reward model (its trunk and score "
        "head, adapted like the policy), one more model in memory.",
    )
    peft: PeftOptions = option(
        default_factory=PeftOptions,
        help="lora (default): train an adapter; the reference is the policy with the adapter "
        "off, so no second copy. none: train every weight against a frozen copy. prompt_tuning "
        "is not supported.",
    )
    training: TrainingOptions = option(
        default_factory=TrainingOptions,
        help="max_steps = PPO iterations, save_steps and logging_steps count iterations, "
        "batch_size = sequences per forward pass, max_grad_norm clips each PPO step.",
    )
    rollout_batch_size: int = option(64, help="Prompts sampled and answered per iteration.")
    mini_batch_size: int = option(
        16, help="Responses per optimizer step; must divide rollout_batch_size."
    )
    ppo_epochs: int = option(4, help="Passes over each rollout batch.")
    max_new_tokens: int = option(48, help="Longest response in tokens.")
    temperature: float = option(
        1.0,
        help="Sampling temperature; log-probs, the KL and the PPO ratio are taken at the same "
        "one (top_k/top_p truncation is not reflected in them).",
    )
    top_k: int = option(0, help="Sample from the k likeliest tokens only; 0 = off.")
    top_p: float = option(1.0, help="Nucleus sampling mass; 1 = off.")
    gamma: float = option(1.0, help="Discount over response tokens.")
    lam: float = option(0.95, help="GAE lambda: 0 = one-step TD, 1 = Monte Carlo.")
    clip_range: float = option(0.2, help="PPO's clip on the probability ratio: [1-c, 1+c].")
    clip_range_value: float = option(
        0.2, help="How far a value prediction may move from its rollout-time value per iteration."
    )
    vf_coef: float = option(0.1, help="Weight of the value loss in the total loss.")
    kl_coef: float = option(
        0.05, help="Weight of the per-token KL penalty (the start value with adaptive_kl)."
    )
    adaptive_kl: bool = option(
        False, help="Adapt kl_coef towards kl_target (Ziegler et al.) instead of keeping it fixed."
    )
    kl_target: float = option(6.0, help="adaptive_kl: the KL per response to steer towards.")
    kl_horizon: int = option(
        10000, help="adaptive_kl: samples over which the coefficient adjusts; larger is slower."
    )
    kl_estimator: Literal["k1", "k3"] = option(
        "k1",
        help="Per-token KL estimate in the penalty: k1 = log p - log p_ref (unbiased, can be "
        "negative); k3 = (r - 1) - log r with r = p_ref / p (unbiased, never negative).",
    )
    whiten_advantages: bool = option(
        True, help="Normalise the advantages of each batch to zero mean and unit variance."
    )
    early_stop_kl: float | None = option(
        None,
        help="Stop the PPO epochs of an iteration once a step's approximate KL between the "
        "rollout policy and the updated one exceeds this; unset = always run every epoch.",
    )
    max_kl_to_reference: float | None = option(
        None,
        help="KL bound: stop training when a rollout's mean KL to the reference per response "
        "(kl_estimator summed over tokens) exceeds this, and keep the last policy whose rollout "
        "was within it. An estimate from rollout_batch_size samples; unset = no bound.",
    )
    eval_prompts: int = option(
        64, help="Distinct held-out prompts the reward and KL are measured on before and after."
    )
    eval_samples_per_prompt: int = option(
        1, help="Sampled responses per held-out prompt; more steady the held-out means."
    )

    def __post_init__(self) -> None:
        if self.peft.method == "prompt_tuning":
            # Checked before the shared checks, which would suggest save_adapter_only=true.
            # The soft prompt shifts every position, so the response's log-probs and values
            # would have to be re-indexed per model; not worth it for PPO.
            raise ConfigError(
                "peft.method=prompt_tuning is not supported by ppo; use peft.method=lora or none"
            )
        super().__post_init__()
        if self.reward not in ("reward_model", "gold"):
            raise ConfigError(f"reward must be reward_model or gold, got {self.reward!r}")
        if self.value_head not in ("policy", "reward_model"):
            raise ConfigError(f"value_head must be policy or reward_model, got {self.value_head!r}")
        needs_rm = [
            f"{k}=reward_model"
            for k in ("reward", "value_head")
            if getattr(self, k) == "reward_model"
        ]
        if needs_rm and not (self.reward_model or "").strip():
            raise ConfigError(
                f"{' and '.join(needs_rm)} need a reward model: set reward_model=<the "
                "reward_model stage's output folder>, or use reward=gold and value_head=policy"
            )
        for name in (
            "rollout_batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "eval_prompts",
            "eval_samples_per_prompt",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(
                f"mini_batch_size ({self.mini_batch_size}) must divide rollout_batch_size "
                f"({self.rollout_batch_size}); e.g. rollout_batch_size=64, mini_batch_size=16"
            )
        if self.training.gradient_accumulation_steps != 1:
            raise ConfigError(
                "ppo takes one optimizer step per mini_batch_size responses and splits it into "
                "forward passes of training.batch_size itself; leave "
                "training.gradient_accumulation_steps=1"
            )
        if self.training.gradient_checkpointing:
            # transformers checkpoints only in train mode, and PPO keeps every model in eval
            # mode (no dropout), so the option would silently do nothing
            raise ConfigError(
                "ppo does not support training.gradient_checkpointing; set it to false, and "
                "lower training.batch_size to save memory"
            )
        if self.training.eval_steps is not None:
            raise ConfigError(
                "ppo measures held-out prompts before and after training only; leave "
                "training.eval_steps unset (the rollout statistics are logged every iteration)"
            )
        if self.training.precision == "fp16":
            raise ConfigError("ppo has no fp16 loss scaling; use training.precision=bf16 or fp32")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip_range", "clip_range_value"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}; 0.2 is usual")
        for name in ("vf_coef", "kl_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            raise ConfigError(
                "adaptive_kl=true needs kl_target > 0 and kl_horizon >= 1; e.g. kl_target=6, "
                "kl_horizon=10000"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        for name in ("early_stop_kl", "max_kl_to_reference"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0, or unset for no limit; got {value}")


def run(
    config: PpoStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> TrainResult:
    """Train ``config.model`` with PPO on the prompts of a data folder; save it under ``output``.

    Writes ``output/model`` (the merged policy, or its adapter with ``save_adapter_only``),
    ``output/checkpoints/iter-N`` (every ``training.save_steps`` iterations; a rerun resumes
    from the newest complete one, which is what makes a retried KFP task cheap) and
    ``output/metrics.json``.

    Args:
        config: The stage config.
        data: A folder (local or ``s3://``) with ``train.parquet`` and ``eval.parquet``: the
            ingest stage's preference pairs (or prep's conversations); only prompts are used.
        output: A local folder.
        tracker: Where params and per-iteration metrics go; a :class:`NullTracker` when None.

    Returns:
        The model folder, the metrics (``reward_initial`` and ``reward``: mean score of sampled
        responses to held-out prompts by the reference and by the policy; ``kl_to_reference``;
        ``iterations``, ``stopped_at_kl_bound``, ...) and the checkpoint resumed from.

    Raises:
        ConfigError: The output is not local, or the starting model is an adapter that cannot
            be merged.
        DataError: The data folder holds no prompts in one of its splits.
        ModelError: A model cannot be loaded.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = _local_folder(output)

    # prompts to learn on, held-out prompts to measure on, and what scores the responses
    train_prompts = load_prompts(data, "train", tracker)
    eval_prompts = load_prompts(data, "eval", tracker)[: config.eval_prompts]
    scorer = build_scorer(config)

    # the policy with its adapter and critic, and the optimizer
    learner, tokenizer = build_learner(config)

    # the reference's held-out reward is the baseline PPO must beat
    initial = held_out(config, learner, tokenizer, eval_prompts, scorer, reference=True)
    log.info("ppo: the reference scores %.4f on held-out prompts", initial["reward"])

    # resume from the newest complete checkpoint (local, else stored), RNG states included
    resume = resume_checkpoint(out, config.training, latest_checkpoint)
    if resume is not None:
        restore_checkpoint(learner, resume)
        tracker.set_tags({"alignpipe.resumed_from": resume})

    # train: rollouts and PPO epochs until max_steps, or until the KL bound is reached
    started = time.monotonic()
    stopped = train(config, learner, tokenizer, train_prompts, scorer, out, tracker)
    seconds = time.monotonic() - started

    # measure the policy on the same prompts, from the same seed, and log
    final = held_out(config, learner, tokenizer, eval_prompts, scorer, reference=False)
    metrics = _metrics(initial, final, learner, seconds, resume, stopped)
    tracker.log_metrics(metrics, step=learner.iteration)
    tracker.log_dict(metrics, METRICS_FILE)
    log.info("ppo: held-out reward %.4f -> %.4f", metrics["reward_initial"], metrics["reward"])

    # save
    model_dir = save_stage_model(config, learner.policy, tokenizer, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from=resume)


# -- data and scoring ----------------------------------------------------------------------------


def load_prompts(data: str, split: str, tracker: Tracker | None = None) -> list[Messages]:
    """The distinct prompts of one split of a data folder, in file order.

    Preference and feedback records give their ``prompt``; conversations give the messages
    before their last assistant turn.

    Raises:
        DataError: The split is missing or holds no prompts.
    """
    records, digest = read_stage_split(
        data,
        split,
        "give ppo the output folder of the ingest stage (alignpipe ingest INPUT --output DIR)",
    )
    with_prompts = [{"prompt": _prompt_of(r, data)} for r in records]
    prompts = evaluate.distinct_prompts(with_prompts, len(with_prompts))
    if not prompts:
        raise DataError(
            f"the {split} split of {data} holds no prompts; ppo needs both splits (re-run "
            "ingest with more data, or with eval_fraction > 0 for the eval split)"
        )
    log.info("ppo: %d distinct %s prompts from %s", len(prompts), split, data)
    if tracker is not None:
        uri = split_uri(data, split)
        tracker.log_dataset(f"prompts-{split}", uri, digest, split, len(records))
    return prompts


def _prompt_of(record: dict[str, Any], data: str) -> Messages:
    if record.get("prompt") is not None:
        return record["prompt"]
    turns = record.get("messages") or []
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(
            f"{data} holds records with neither a prompt nor an assistant turn after one; ppo "
            "reads prompts from the ingest (or prep) stage's output"
        )
    return turns[:last]


def build_scorer(config: PpoStageConfig) -> evaluate.Scorer:
    """The reward of a response: the reward model's score, or the synthetic task's gold rule."""
    if config.reward == "gold":
        return evaluate.GoldScorer()
    from alignpipe.reward_model import RewardScorer

    return RewardScorer(config.reward_model, batch_size=config.training.batch_size)


# -- models --------------------------------------------------------------------------------------


class LinearValueHead(torch.nn.Module):
    """``value_head=policy``: one linear layer on the policy's last hidden states.

    Sharing the policy's trunk costs ``hidden_size + 1`` weights and no extra forward pass; the
    value loss then also trains the adapter, and ``vf_coef`` keeps it from crowding out the
    policy's loss. The alternative, a separate critic (:class:`RewardModelCritic`), learns its
    own features at the cost of a second model in memory. Zero-initialised: it first predicts
    no return at all, so the first advantages are the rewards-to-go.
    """

    shares_trunk = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Values ``(B, W)`` from the policy's last hidden states ``(B, W, H)``."""
        return self.linear(hidden.float()).squeeze(-1)


class RewardModelCritic(torch.nn.Module):
    """``value_head=reward_model``: a separate critic initialised from the reward model.

    The reward model's score of a prefix is a fair first guess of its value (Ouyang et al.,
    2022). Its trunk is adapted with the stage's peft options and its score head is trained;
    the price is a second model in memory and in every forward pass.
    """

    shares_trunk = False

    def __init__(self, config: PpoStageConfig) -> None:
        from alignpipe.reward_model import load_reward_model

        super().__init__()
        critic = load_reward_model(
            config.reward_model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
        )
        if hasattr(critic, "merge_and_unload"):  # a reward model saved as an adapter
            critic = critic.merge_and_unload()
        if not isinstance(getattr(critic, "score", None), torch.nn.Module):
            raise ConfigError(
                f"the reward model {config.reward_model} has no `score` head to read values "
                "from; use value_head=policy"
            )
        self.model = models.attach_peft(critic, config.peft, task="SEQ_CLS")

    def forward(
        self, hidden: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Values ``(B, W)``: the score head on every position, not only the last one."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return inner.score(out.hidden_states[-1]).float().squeeze(-1)


@dataclass
class Learner:
    """What PPO trains, and everything a checkpoint has to restore to continue a run."""

    policy: Any
    reference: Any | None  # a frozen copy under full fine-tuning; None = the adapter switched off
    value_head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_controller: rl.FixedKLController
    rng: random.Random  # every random choice of the loop: prompts, sampling seeds, mini-batches
    device: torch.device
    bf16: bool = False
    iteration: int = 0
    # non-padding prompt + response tokens through PPO steps in this process (DPO's measure)
    train_tokens: int = 0
    # with max_kl_to_reference: the iteration and trainable weights of the last policy whose
    # rollout was within the bound, in CPU memory; checkpointed, so a resumed run that finds
    # itself over the bound at once still goes back to it
    within_bound: tuple[int, dict[str, torch.Tensor]] | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters: the adapter (or every policy weight) and the critic's."""
        return _trainable(self.policy, self.value_head)

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The reference to score with: the policy with its adapter off, or the frozen copy."""
        if self.reference is not None:
            yield self.reference
            return
        with self.policy.disable_adapter():
            yield self.policy

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for forward passes when the precision asks for it."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def load_policy(config: PpoStageConfig) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the starting model and its tokenizer, without this stage's adapter.

    A starting model saved as a LoRA adapter is merged first: the reference must be the SFT
    model itself, and the reference is the policy with every adapter off.

    Raises:
        ConfigError: The tokenizer has no chat template, or the starting model is an adapter
            that cannot be merged.
        ModelError: The model cannot be resolved or loaded.
    """
    # resolve once, so that an s3:// model is downloaded once for both loaders
    path = models.resolve_model(config.model)
    tokenizer = models.load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    if not tokenizer.chat_template:
        raise ConfigError(
            f"the tokenizer of {config.model} has no chat template, which ppo renders prompts "
            "with; start from a chat model, or one built with `alignpipe tiny-model`"
        )
    policy = models.load_causal_lm(
        path, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )
    if hasattr(policy, "peft_config"):
        if not hasattr(policy, "merge_and_unload"):
            raise ConfigError(
                f"the starting model {config.model} is an adapter that cannot be merged; save "
                "the sft model merged (save_adapter_only=false there)"
            )
        policy = policy.merge_and_unload()
        log.info("ppo: merged the starting model's adapter into its base weights")
    log.info("ppo: loaded %s (peft %s)", config.model, config.peft.method)
    return policy, tokenizer


def build_learner(config: PpoStageConfig) -> tuple[Learner, PreTrainedTokenizerBase]:
    """Load the policy, attach the adapter and the critic, and build the optimizer.

    Dropout stays off throughout (every model in eval mode): it would make the policy's
    log-probs differ between the rollout and the update even before any step, and with them
    the ratio PPO clips.
    """
    from transformers import get_scheduler, set_seed

    options = config.training
    if options.num_threads is not None:
        torch.set_num_threads(options.num_threads)
    bf16, _ = resolve_precision(options.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_policy(config)

    # full fine-tuning needs a frozen copy as the reference; an adapter just switches off
    reference = None
    if config.peft.method == "none":
        reference = copy.deepcopy(policy).requires_grad_(False).to(device).eval()
    # LoRA's A matrices are random: seed them like the rest of the run
    set_seed(options.seed)
    policy = models.attach_peft(policy, config.peft).to(device).eval()
    if config.value_head == "policy":
        value_head = LinearValueHead(policy.config.hidden_size)
    else:
        _check_same_vocabulary(config.reward_model, tokenizer)
        value_head = RewardModelCritic(config)
    value_head = value_head.to(device).eval()

    # optimizer, schedule and KL coefficient
    optimizer = torch.optim.AdamW(
        _trainable(policy, value_head), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    updates = config.rollout_batch_size // config.mini_batch_size * config.ppo_epochs
    scheduler = get_scheduler(
        options.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(options.warmup_ratio * options.max_steps * updates),
        num_training_steps=options.max_steps * updates,
    )
    kl_controller = (
        rl.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else rl.FixedKLController(config.kl_coef)
    )
    rng = random.Random(options.seed)
    learner = Learner(
        policy, reference, value_head, optimizer, scheduler, kl_controller, rng, device, bf16
    )
    return learner, tokenizer


def _trainable(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _check_same_vocabulary(reward_model: str, tokenizer: PreTrainedTokenizerBase) -> None:
    if models.load_tokenizer(reward_model).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"value_head=reward_model reads the policy's token ids, but {reward_model} has "
            "another tokenizer; train the reward model from the policy's sft model, or use "
            "value_head=policy"
        )


# -- rollouts ------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Prompt + response sequences, right-padded, and where each response token sits.

    ``input_ids`` and ``attention_mask`` are ``(B, W)``; ``response_ids`` and ``mask`` are
    ``(B, T)``; ``positions`` ``(B, T)`` indexes the logit (and hidden state) that predicts
    each response token, its own position minus one. Right padding keeps positions starting
    at 0 for every row, so no position ids are needed.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor

    def rows(self, index: torch.Tensor) -> TokenBatch:
        """The sub-batch of the rows in ``index``."""
        return TokenBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def pack(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> TokenBatch:
    """Lay out ``prompt + response`` sequences for scoring; every response has >= 1 token."""
    rows = len(prompt_ids)
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    longest = max(len(r) for r in response_ids)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    responses = torch.full((rows, longest), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, longest)
    # padded response slots point at position 0: valid to index, and masked out everywhere
    positions = torch.zeros(rows, longest, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        tokens = [*prompt, *response]
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        responses[row, : len(response)] = torch.tensor(response)
        mask[row, : len(response)] = 1.0
        positions[row, : len(response)] = torch.arange(len(prompt) - 1, len(tokens) - 1)
    batch = TokenBatch(input_ids, attention_mask, responses, mask, positions)
    return TokenBatch(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))


def forward(
    model: Any,
    batch: TokenBatch,
    temperature: float,
    value_head: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score a batch's response tokens under ``model`` (with gradients, if enabled).

    The log-probs are those of ``softmax(logits / temperature)``: the distribution the sampler
    drew the tokens from (top-k/top-p truncation aside), so the PPO ratio and the KL compare
    what was actually sampled.

    Returns:
        ``(logp, logits, values)``: log-probs ``(B, T)`` of the response tokens, their
        tempered logits ``(B, T, V)`` in float32, and the critic's values ``(B, T)`` of the
        state before each token (None without a value head).
    """
    shares_trunk = value_head is not None and value_head.shares_trunk
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=shares_trunk,
        use_cache=False,
    )
    vocab = out.logits.shape[-1]
    index = batch.positions.unsqueeze(-1)
    logits = out.logits.gather(1, index.expand(-1, -1, vocab)).float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.response_ids.unsqueeze(-1))
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1] if shares_trunk else None
        per_position = value_head(hidden, batch.input_ids, batch.attention_mask)  # (B, W)
        values = per_position.gather(1, batch.positions)
    return logp.squeeze(-1), logits, values


@dataclass
class Rollout:
    """A batch of sampled responses and what PPO needs of them; per-token tensors are (B, T)."""

    prompts: list[Messages]
    texts: list[str]
    batch: TokenBatch
    scores: torch.Tensor  # (B,)
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class _Sampling:
    """The sampling settings :func:`alignpipe.evaluate.generate_responses` reads."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int
    do_sample: bool = True


def sample(
    config: PpoStageConfig,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    seed: int,
) -> evaluate.Generation:
    """Sample one response per prompt: batched, left-padded, with the KV cache, from ``seed``."""
    settings = _Sampling(
        config.max_new_tokens, config.temperature, config.top_p, seed, config.training.batch_size
    )
    return evaluate.generate_responses(model, tokenizer, prompts, settings, top_k=config.top_k)


def collect_rollout(
    config: PpoStageConfig,
    learner: Learner,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    scorer: evaluate.Scorer,
) -> Rollout:
    """Answer ``prompts`` with the policy, score the answers, and compute advantages.

    Per-token rewards are the KL penalty against the reference plus the score at each
    response's last token (:func:`alignpipe.rl.token_rewards`); advantages come from GAE and
    are whitened over the batch when ``whiten_advantages``.
    """
    # sample, from a seed drawn from the run's RNG (so a resumed run draws the same)
    started = time.monotonic()
    with learner.autocast():
        generation = sample(
            config, learner.policy, tokenizer, prompts, learner.rng.randrange(2**31)
        )
    generation_seconds = time.monotonic() - started
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = pack(generation.prompt_ids, generation.response_ids, pad_id, learner.device)

    # score the responses; log-probs of policy and reference, values, entropy
    scores = torch.tensor(scorer.score(prompts, generation.texts), device=learner.device)
    logp, ref_logp, values, entropy = _score_tokens(config, learner, batch)

    # per-token rewards, advantages and returns
    mask = batch.mask
    kl = rl.per_token_kl(logp, ref_logp, config.kl_estimator) * mask
    kl_coef = learner.kl_controller.value
    rewards = rl.token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = rl.gae(rewards, values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = rl.whiten(advantages, mask)

    lengths = mask.sum(dim=1)
    stats = {
        "score": scores.mean().item(),
        "kl": rl.masked_sum(kl, mask, dim=1).mean().item(),
        "non_score_reward": rl.masked_sum(-kl_coef * kl, mask, dim=1).mean().item(),
        "kl_coef": kl_coef,
        "entropy": rl.masked_mean(entropy, mask).item(),
        "response_length": lengths.mean().item(),
        "explained_variance": rl.explained_variance(values, returns, mask).item(),
        "value_mean": rl.masked_mean(values, mask).item(),
        "generation_tokens_per_s": lengths.sum().item() / max(generation_seconds, 1e-9),
    }
    return Rollout(
        prompts=prompts,
        texts=generation.texts,
        batch=batch,
        scores=scores,
        logp=logp,
        ref_logp=ref_logp,
        values=values,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        stats=stats,
    )


def _score_tokens(
    config: PpoStageConfig, learner: Learner, batch: TokenBatch
) -> tuple[torch.Tensor, ...]:
    """Log-probs under the policy and the reference, values (0 on padding) and entropies."""
    parts: dict[str, list[torch.Tensor]] = {"logp": [], "ref": [], "values": [], "entropy": []}
    with torch.no_grad(), learner.autocast():
        for index in _chunks(len(batch.mask), config.training.batch_size, learner.device):
            part = batch.rows(index)
            logp, logits, values = forward(
                learner.policy, part, config.temperature, learner.value_head
            )
            parts["logp"].append(logp)
            parts["values"].append(values * part.mask)
            parts["entropy"].append(rl.entropy_from_logits(logits))
            with learner.reference_model() as reference:
                parts["ref"].append(forward(reference, part, config.temperature)[0])
    return tuple(torch.cat(parts[k]) for k in ("logp", "ref", "values", "entropy"))


def _chunks(rows: int, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, rows, size):
        yield torch.arange(start, min(start + size, rows), device=device)


# -- PPO updates ---------------------------------------------------------------------------------


def ppo_update(config: PpoStageConfig, learner: Learner, rollout: Rollout) -> dict[str, float]:
    """Several epochs of clipped PPO steps over a rollout, in shuffled mini-batches.

    Each step takes ``mini_batch_size`` responses, in forward passes of ``training.batch_size``
    whose gradients add up, clips the global gradient norm and steps the optimizer. With
    ``early_stop_kl``, the epochs end after the first step whose approximate KL from the
    rollout's policy exceeds it.

    Returns:
        Means over the steps taken: ``policy_loss``, ``value_loss``, ``clip_fraction``,
        ``value_clip_fraction``, ``approx_kl``, ``grad_norm``; and ``ppo_steps``,
        ``train_tokens_per_s`` and ``learning_rate``.
    """
    totals: dict[str, float] = {}
    steps = tokens = 0
    started = time.monotonic()
    for index in _mini_batches(config, learner, len(rollout.prompts)):
        step, step_tokens = _ppo_step(config, learner, rollout, index)
        for name, value in step.items():
            totals[name] = totals.get(name, 0.0) + value
        steps, tokens = steps + 1, tokens + step_tokens
        if config.early_stop_kl is not None and step["approx_kl"] > config.early_stop_kl:
            log.info(
                "ppo: approx KL %.4g passed early_stop_kl at step %d", step["approx_kl"], steps
            )
            break
    stats = {name: total / steps for name, total in totals.items()}
    stats["ppo_steps"] = float(steps)
    stats["train_tokens_per_s"] = tokens / max(time.monotonic() - started, 1e-9)
    stats["learning_rate"] = learner.scheduler.get_last_lr()[0]
    learner.train_tokens += tokens
    return stats


def _mini_batches(config: PpoStageConfig, learner: Learner, rows: int) -> Iterator[torch.Tensor]:
    """Row indices of each mini-batch, epoch after epoch, shuffled by the run's RNG."""
    for _ in range(config.ppo_epochs):
        order = learner.rng.sample(range(rows), rows)
        for start in range(0, rows, config.mini_batch_size):
            chunk = order[start : start + config.mini_batch_size]
            yield torch.tensor(chunk, device=learner.device)


def _ppo_step(
    config: PpoStageConfig, learner: Learner, rollout: Rollout, index: torch.Tensor
) -> tuple[dict[str, float], int]:
    """One optimizer step on the rollout rows in ``index``; returns its stats and tokens."""
    learner.optimizer.zero_grad(set_to_none=True)
    step_tokens = rollout.batch.mask[index].sum().clamp(min=1)
    stats = dict.fromkeys(
        ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"), 0.0
    )
    tokens = 0
    for chunk in _chunks(len(index), config.training.batch_size, learner.device):
        rows = index[chunk]
        part = rollout.batch.rows(rows)
        with learner.autocast():
            logp, _, values = forward(learner.policy, part, config.temperature, learner.value_head)
        pg_loss, clip_fraction, approx_kl = rl.policy_loss(
            logp, rollout.logp[rows], rollout.advantages[rows], part.mask, config.clip_range
        )
        vf_loss, value_clip_fraction = rl.value_loss(
            values, rollout.values[rows], rollout.returns[rows], part.mask, config.clip_range_value
        )
        # per-token means of each forward pass, weighted by its share of the step's tokens,
        # add up to the per-token mean over the whole mini-batch
        share = part.mask.sum() / step_tokens
        ((pg_loss + config.vf_coef * vf_loss) * share).backward()
        for name, value in zip(
            stats, (pg_loss, vf_loss, clip_fraction, value_clip_fraction, approx_kl), strict=True
        ):
            stats[name] += (value.detach() * share).item()
        tokens += int(part.attention_mask.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), config.training.max_grad_norm)
    learner.optimizer.step()
    learner.scheduler.step()
    stats["grad_norm"] = float(grad_norm)
    return stats, tokens


# -- the loop ------------------------------------------------------------------------------------


def train(
    config: PpoStageConfig,
    learner: Learner,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    scorer: evaluate.Scorer,
    output: Path,
    tracker: Tracker,
) -> bool:
    """Run PPO iterations from ``learner.iteration + 1`` up to ``training.max_steps``.

    Each iteration samples ``rollout_batch_size`` prompts, answers and scores them, takes the
    PPO epochs, updates the KL coefficient, logs its stats at step = iteration, and writes a
    checkpoint every ``training.save_steps`` iterations.

    With ``max_kl_to_reference``, a rollout whose mean KL per response exceeds the bound ends
    training, and the policy (and critic) go back to the last ones whose rollout was within it.

    Returns:
        True when the KL bound ended training.
    """
    options = config.training
    store = checkpoint_store(options)
    bound = config.max_kl_to_reference
    while learner.iteration < options.max_steps:
        iteration = learner.iteration + 1

        # rollout: a batch of prompts, answered and scored
        batch = _sample_prompts(learner.rng, prompts, config.rollout_batch_size)
        rollout = collect_rollout(config, learner, tokenizer, batch, scorer)

        # the KL bound: keep the last policy within it and stop
        if bound is not None and rollout.stats["kl"] > bound:
            if learner.within_bound is not None:
                learner.iteration = learner.within_bound[0]
                _load_trainable(learner, learner.within_bound[1])
            log.warning(
                "ppo: KL to the reference %.4g passed max_kl_to_reference %.4g at iteration %d; "
                "stopping with the policy of iteration %d",
                rollout.stats["kl"], bound, iteration, learner.iteration,
            )  # fmt: skip
            tracker.set_tags({"alignpipe.stopped": "max_kl_to_reference"})
            return True
        if bound is not None:
            learner.within_bound = (learner.iteration, _trainable_state(learner))

        # PPO epochs on the batch, then the KL coefficient follows the measured KL
        stats = {**rollout.stats, **ppo_update(config, learner, rollout)}
        learner.kl_controller.update(rollout.stats["kl"], config.rollout_batch_size)
        learner.iteration = iteration

        # log and checkpoint
        tracker.log_metrics(stats, step=iteration)
        if iteration == 1 or iteration % options.logging_steps == 0:
            shown = " ".join(f"{k}={stats[k]:.4g}" for k in _SHOWN)
            log.info("ppo: iteration %d/%d %s", iteration, options.max_steps, shown)
        if iteration % options.save_steps == 0:
            save_checkpoint(output, learner, options.save_total_limit, store)
    return False


_SHOWN = ("score", "kl", "entropy", "response_length", "policy_loss", "value_loss", "clip_fraction")


def _sample_prompts(rng: random.Random, prompts: list[Messages], count: int) -> list[Messages]:
    # without replacement when there are enough prompts; a small prompt set repeats
    if count <= len(prompts):
        return rng.sample(prompts, count)
    return rng.choices(prompts, k=count)


def _trainable_state(learner: Learner) -> dict[str, torch.Tensor]:
    # kept in CPU memory: under full fine-tuning this is a whole copy of the policy
    return {
        f"{prefix}.{name}": value.detach().to("cpu", copy=True)
        for prefix, module in (("policy", learner.policy), ("value_head", learner.value_head))
        for name, value in _named_trainable(module).items()
    }


def _load_trainable(learner: Learner, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for prefix, module in (("policy", learner.policy), ("value_head", learner.value_head)):
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.copy_(state[f"{prefix}.{name}"])


def _named_trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, so a full model saves without duplicates
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# -- held-out measurement ------------------------------------------------------------------------


def held_out(
    config: PpoStageConfig,
    learner: Learner,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    scorer: evaluate.Scorer,
    reference: bool = False,
) -> dict[str, float]:
    """Mean score of sampled responses to held-out prompts, and the policy's KL to reference.

    Both sides sample with the stage's temperature and top-k/top-p from ``training.seed``,
    ``eval_samples_per_prompt`` responses per prompt, so before and after compare like for
    like. ``kl`` (the policy only) is the mean over responses of ``log p(y|x) - log p_ref(y|x)``
    at that temperature: the Monte Carlo estimate of KL(policy || reference) per response.

    Returns:
        ``reward``, ``response_length`` and ``n`` (responses); ``kl`` for the policy.
    """
    prompts = [p for p in prompts for _ in range(config.eval_samples_per_prompt)]
    seed = config.training.seed
    with learner.autocast():
        if reference:
            with learner.reference_model() as model:
                generation = sample(config, model, tokenizer, prompts, seed)
        else:
            generation = sample(config, learner.policy, tokenizer, prompts, seed)
    scores = scorer.score(prompts, generation.texts)
    result = {
        "reward": sum(scores) / len(scores),
        "response_length": sum(map(len, generation.response_ids)) / len(prompts),
        "n": float(len(prompts)),
    }
    if not reference:
        sequences = list(zip(generation.prompt_ids, generation.response_ids, strict=True))
        size, temperature = config.training.batch_size, config.temperature
        with learner.autocast():
            logps = evaluate.completion_logprobs(learner.policy, sequences, size, temperature)
            with learner.reference_model() as model:
                ref_logps = evaluate.completion_logprobs(model, sequences, size, temperature)
        result["kl"] = sum(p - r for p, r in zip(logps, ref_logps, strict=True)) / len(prompts)
    return result


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    output: Path, learner: Learner, keep: int, store: CheckpointStore | None = None
) -> Path:
    """Write ``output/checkpoints/iter-N`` and keep only the newest ``keep`` checkpoints.

    It holds the policy's trainable weights (the adapter, or every weight under full
    fine-tuning), the critic's, the optimizer and schedule, the KL coefficient, the RNG states
    (the loop's python RNG, torch's and CUDA's), the iteration, and with a KL bound the last
    policy within it (a second copy of the trainable weights). A marker file is written
    last, so a checkpoint interrupted mid-save is never resumed from. With a ``store``
    (``training.checkpoint_uri``) the complete checkpoint is then copied there too.
    """
    from safetensors.torch import save_file

    folder = output / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{learner.iteration}"
    if folder.exists():  # an incomplete one, left by a killed run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, module in (("policy", learner.policy), ("value_head", learner.value_head)):
        weights = {k: v.detach().cpu().contiguous() for k, v in _named_trainable(module).items()}
        save_file(weights, str(folder / f"{name}.safetensors"))
    torch.save(
        {
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        folder / "optimizer.pt",
    )
    state = {
        "iteration": learner.iteration,
        "kl_controller": learner.kl_controller.state_dict(),
        "python_rng": learner.rng.getstate(),
    }
    if learner.within_bound is not None:
        state["within_bound_iteration"] = learner.within_bound[0]
        save_file(learner.within_bound[1], str(folder / WITHIN_BOUND_FILE))
    (folder / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
    (folder / COMPLETE_MARKER).write_text(f"{learner.iteration}\n", encoding="utf-8")
    log.info("ppo: checkpoint at iteration %d: %s", learner.iteration, folder)
    for old in _complete_checkpoints(output)[:-keep]:
        shutil.rmtree(old[1])
    if store is not None:
        store.upload(folder)
    return folder


def latest_checkpoint(output: str | Path) -> str | None:
    """The newest complete checkpoint under ``output/checkpoints``, or None."""
    found = _complete_checkpoints(Path(output))
    if not found:
        return None
    iteration, folder = found[-1]
    log.info("ppo: resuming from the checkpoint of iteration %d: %s", iteration, folder)
    return str(folder)


def _complete_checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        suffix = child.name.removeprefix(CHECKPOINT_PREFIX)
        complete = (child / COMPLETE_MARKER).is_file()
        if child.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and complete:
            found.append((int(suffix), child))
    return sorted(found)


def restore_checkpoint(learner: Learner, checkpoint: str | Path) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` into ``learner``.

    Raises:
        ConfigError: The checkpoint's weights do not fit this config's policy or critic.
    """
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    for name, module in (("policy", learner.policy), ("value_head", learner.value_head)):
        weights = load_file(str(folder / f"{name}.safetensors"), device=str(learner.device))
        if set(weights) != set(_named_trainable(module)):
            raise ConfigError(
                f"the {name} weights of checkpoint {folder} do not fit this config (another "
                "peft method or value head?); delete the checkpoints folder to start afresh"
            )
        module.load_state_dict(weights, strict=False)
    state = torch.load(folder / "optimizer.pt", weights_only=True, map_location=learner.device)
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    learner.iteration = int(meta["iteration"])
    learner.kl_controller.load_state_dict(meta["kl_controller"])
    version, internal, gauss = meta["python_rng"]
    learner.rng.setstate((version, tuple(internal), gauss))
    if "within_bound_iteration" in meta:
        weights = load_file(str(folder / WITHIN_BOUND_FILE), device="cpu")
        learner.within_bound = (int(meta["within_bound_iteration"]), weights)


# -- results -------------------------------------------------------------------------------------


def _metrics(
    initial: dict[str, float],
    final: dict[str, float],
    learner: Learner,
    seconds: float,
    resume: str | None,
    stopped: bool,
) -> dict[str, float]:
    return {
        "reward_initial": initial["reward"],
        "reward": final["reward"],
        "reward_delta": final["reward"] - initial["reward"],
        "kl_to_reference": final["kl"],
        "response_length_initial": initial["response_length"],
        "response_length": final["response_length"],
        "eval_samples": final["n"],
        "iterations": float(learner.iteration),
        "resumed_from_iteration": float(_iteration_of(resume) if resume else 0),
        "stopped_at_kl_bound": float(stopped),
        "kl_coef": learner.kl_controller.value,
        "train_seconds": seconds,
        "train_tokens": float(learner.train_tokens),
    }


def _iteration_of(checkpoint: str) -> int:
    return int(Path(checkpoint).name.removeprefix(CHECKPOINT_PREFIX))


def _local_folder(output: str) -> Path:
    if "://" in output:
        raise ConfigError(
            f"ppo writes to a local folder, got {output!r}; give a local --output (a KFP "
            "component gets one) and upload the model afterwards"
        )
    folder = Path(output).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
