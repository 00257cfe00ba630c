"""Evaluation stage: compare a policy with its reference model and decide whether it may ship.

Both models answer the same held-out prompts; the answers are scored (the synthetic task's gold
rule, or any registered :class:`Scorer`), and the KL the policy spent, perplexity on SFT eval
data and implicit-reward accuracy on held-out preference pairs are measured. The stage writes
metrics, samples and a Markdown/HTML report with the gate decision.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alignpipe import storage, synthetic
from alignpipe.config import flatten, option
from alignpipe.data.build import read_stage_split, split_uri
from alignpipe.data.records import prompt_key
from alignpipe.errors import ConfigError, DataError, ModelError
from alignpipe.tracking import NullTracker, Tracker, fingerprint_file
from alignpipe.training import perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
GATE_TAG = "alignpipe.gate"
KL_METRIC = "kl_policy_reference"
PLOT_FILE = "reward_hist.png"


class Scorer(Protocol):
    """Scores responses to prompts; higher is better. A reward model scorer implements this too."""

    def score(self, prompts: list[Messages], responses: list[str]) -> list[float]:
        """Return one score per (prompt messages, response text) pair."""


class GoldScorer:
    """The synthetic task's gold rule (:func:`alignpipe.synthetic.gold_reward`)."""

    def score(self, prompts: list[Messages], responses: list[str]) -> list[float]:
        """Score each response by the gold rule.

        Raises:
            DataError: A prompt is not one of the synthetic task's prompts.
        """
        scores = []
        for prompt, response in zip(prompts, responses, strict=True):
            try:
                scores.append(synthetic.gold_reward(prompt, response))
            except DataError as err:
                raise DataError(
                    f"{err}; the gold scorer knows only the synthetic task, so drop 'gold' from "
                    "scorers when evaluating other data"
                ) from None
        return scores


def _reward_model_scorer(config: EvalStageConfig) -> Scorer:
    """The reward_model stage's model as a scorer (imported late: it pulls in TRL)."""
    from alignpipe.reward_model import RewardScorer

    return RewardScorer(config.reward_model, batch_size=config.batch_size)


# Scorer name -> factory taking the stage config (a reward model scorer needs its options).
SCORERS: dict[str, Callable[[EvalStageConfig], Scorer]] = {
    "gold": lambda config: GoldScorer(),
    "reward_model": _reward_model_scorer,
}


def register_scorer(name: str, factory: Callable[[EvalStageConfig], Scorer]) -> None:
    """Make a scorer available to ``scorers=[name]``; its metrics are named ``<name>_...``."""
    if not name.isidentifier():
        raise ConfigError(f"scorer name {name!r} must be an identifier (letters, digits, _)")
    SCORERS[name] = factory


def metric_names(
    scorers: Sequence[str], with_perplexity: bool, with_few_shot: bool = False
) -> list[str]:
    """The metrics a run with these scorers computes (``passed`` aside), in report order."""
    names = []
    for scorer in scorers:
        names += [f"{scorer}_reward_{side}" for side in ("policy", "reference", "delta")]
        names.append(f"{scorer}_win_rate")
        if with_few_shot:
            names += [f"{scorer}_reward_{side}" for side in ("base", "few_shot")]
            names.append(f"{scorer}_gain_over_few_shot")
    names += [KL_METRIC, "response_tokens_policy_mean", "response_tokens_reference_mean"]
    names.append("preference_accuracy")
    if with_perplexity:
        names += ["perplexity_policy", "perplexity_reference"]
    return names


@dataclass
class EvalStageConfig:
    """Evaluation: a policy against its reference on held-out prompts and pairs, then the gate."""

    policy: str = option(help="Model reference of the policy to evaluate (folder, s3://, hub id).")
    reference: str = option(
        help="Model reference to compare against: the SFT model the policy was trained from."
    )
    sft_data: str | None = option(
        None,
        help="A data prep output folder: perplexity of both models on its eval conversations. "
        "Unset = no perplexity.",
    )
    scorers: list[str] = option(
        default_factory=lambda: ["gold"],
        help="Response scorers; gold = the synthetic task's gold rule, reward_model = the model "
        "named by reward_model. Each adds <name>_reward_policy/_reference/_delta and "
        "<name>_win_rate.",
    )
    reward_model: str | None = option(
        None,
        help="Reward model for scorers=[reward_model]: the reward_model stage's output folder, "
        "an s3:// prefix or a hub id.",
    )
    num_prompts: int = option(64, help="Distinct held-out prompts both models answer.")
    samples_per_prompt: int = option(
        1,
        help="Responses per prompt and model (with do_sample); more samples steady the means "
        "and the win rate when there are few prompts.",
    )
    max_new_tokens: int = option(24, help="Longest response in tokens.")
    do_sample: bool = option(
        False, help="Sample responses (a true KL estimate) instead of greedy decoding."
    )
    temperature: float = option(1.0, help="Sampling temperature (do_sample=true only).")
    top_p: float = option(1.0, help="Nucleus sampling mass (do_sample=true only); 1 = off.")
    seed: int = option(0, help="Seed of sampling; both models start from it, so runs repeat.")
    batch_size: int = option(16, help="Prompts or sequences per forward pass.")
    max_records: int | None = option(
        None, help="Use at most this many held-out pairs and SFT conversations; unset = all."
    )
    gate_metric: str = option(
        "gold_reward_delta", help="Metric the gate compares with min_improvement."
    )
    min_improvement: float = option(
        0.0, help="The gate passes when gate_metric >= this (and the KL is within max_kl)."
    )
    max_kl: float | None = option(
        None, help="The gate fails when kl_policy_reference exceeds this; unset = no KL limit."
    )
    few_shot: int = option(
        0,
        help="Also score the base model prompted with this many example conversations drawn "
        "from sft_data's train split, so the report shows what fine-tuning bought over "
        "prompting; 0 = no few-shot baseline.",
    )
    few_shot_seed: int = option(0, help="Seed of the draw of few-shot examples for each prompt.")
    base_model: str | None = option(
        None,
        help="The model the few-shot baseline prompts (the model fine-tuning started from); "
        "unset = the reference.",
    )

    def __post_init__(self) -> None:
        for name in ("policy", "reference"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must name a model (a folder, s3:// prefix or hub id)")
        if isinstance(self.scorers, str):
            self.scorers = [self.scorers]
        known = ", ".join(sorted(SCORERS))
        if not self.scorers:
            raise ConfigError(f"scorers is empty; name at least one of: {known}")
        for name in self.scorers:
            if name not in SCORERS:
                raise ConfigError(f"unknown scorer {name!r}; known scorers: {known}")
        if len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"scorers lists a scorer twice: {self.scorers}")
        if "reward_model" in self.scorers and not (self.reward_model or "").strip():
            raise ConfigError(
                "scorers lists reward_model but no reward model is set; set reward_model=<the "
                "reward_model stage's output folder>, or drop reward_model from scorers"
            )
        for name in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"max_records must be at least 1, got {self.max_records}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ConfigError(
                "temperature and top_p apply only when sampling; set do_sample=true, or leave "
                "them at 1.0 for greedy decoding"
            )
        if self.samples_per_prompt > 1 and not self.do_sample:
            raise ConfigError(
                "samples_per_prompt > 1 needs do_sample=true; greedy decoding repeats one answer"
            )
        if self.max_kl is not None and self.max_kl < 0:
            raise ConfigError(f"max_kl must be >= 0 (or unset), got {self.max_kl}")
        if isinstance(self.few_shot, bool) or not isinstance(self.few_shot, int):
            raise ConfigError(f"few_shot must be a whole number, got {self.few_shot!r}")
        if self.few_shot < 0:
            raise ConfigError(f"few_shot must be >= 0 (0 = off), got {self.few_shot}")
        if self.few_shot and self.sft_data is None:
            raise ConfigError(
                "few_shot > 0 draws its examples from the SFT conversations; set sft_data=<a "
                "prep output folder>, or few_shot=0"
            )
        available = metric_names(self.scorers, self.sft_data is not None, self.few_shot > 0)
        if self.gate_metric not in available:
            raise ConfigError(
                f"unknown gate_metric {self.gate_metric!r}; available: {', '.join(available)}"
            )


@dataclass
class EvalResult:
    """What the evaluation stage produced."""

    metrics: dict[str, float]
    passed: bool
    report: Path
    output_dir: Path


@dataclass
class Generation:
    """Responses of one model: token ids (up to and including EOS) and decoded text."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]


def run(
    config: EvalStageConfig, data: str, output: str, tracker: Tracker | None = None
) -> EvalResult:
    """Evaluate the policy against the reference and apply the gate.

    Args:
        config: The stage options.
        data: A preference ingest output folder (local or ``s3://``); its eval split gives the
            prompts (the first ``num_prompts`` distinct ones, in file order) and the held-out
            pairs for ``preference_accuracy``.
        output: Local folder for ``metrics.json``, ``samples.jsonl``, ``report.md``,
            ``report.html`` and ``reward_hist.png``.
        tracker: Where params, metrics and the report go; nowhere when None.

    Returns:
        The metrics (names as in :func:`metric_names`, plus ``passed``), the gate decision and
        the report's path. Same config and inputs give the same metrics.
    """
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    # load: held-out pairs and their prompts, both models on one tokenizer, the scorers
    pairs = _read_eval(data, "preference", config.max_records, tracker)
    prompts = distinct_prompts(pairs, config.num_prompts)
    if len(prompts) < config.num_prompts:
        log.warning("%s has %d distinct eval prompts, fewer than num_prompts", data, len(prompts))
    prompts = [p for p in prompts for _ in range(config.samples_per_prompt)]
    conversations = None
    if config.sft_data is not None:
        conversations = _read_eval(config.sft_data, "conversation", config.max_records, tracker)
    tokenizer, policy, reference = _load_models(config)
    scorers = {name: SCORERS[name](config) for name in config.scorers}
    log.info(
        "evaluating %s against %s on %d prompts", config.policy, config.reference, len(prompts)
    )

    # generate from the same seed on both sides, so identical models give identical responses
    policy_gen = generate_responses(policy, tokenizer, prompts, config)
    reference_gen = generate_responses(reference, tokenizer, prompts, config)

    # score, and measure what the policy spent and learned
    log_ratios = sequence_log_ratios(policy, reference, policy_gen, config.batch_size)
    metrics, samples = _compare(scorers, prompts, policy_gen, reference_gen, log_ratios)
    chosen, rejected = pair_rewards(policy, reference, tokenizer, pairs, config.batch_size)
    metrics["preference_accuracy"] = preference_accuracy(chosen, rejected)
    if conversations is not None:
        metrics.update(_perplexities(policy, reference, tokenizer, conversations, config))
    if config.few_shot:
        baseline = few_shot_baseline(config, tokenizer, reference, prompts, reference_gen, scorers)
        metrics.update(_with_few_shot(metrics, baseline, samples, config.scorers))
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})

    # gate
    passed, reasons = gate(metrics, config.gate_metric, config.min_improvement, config.max_kl)
    metrics["passed"] = float(passed)
    log.info("gate %s: %s", "passed" if passed else "failed", "; ".join(reasons))

    # write and log
    report = _write_outputs(out, config, metrics, samples, passed, reasons)
    _log_outputs(tracker, out, metrics, passed)
    return EvalResult(metrics=metrics, passed=passed, report=report, output_dir=out)


# -- the gate ------------------------------------------------------------------------------------


def gate(
    metrics: Mapping[str, float],
    gate_metric: str,
    min_improvement: float,
    max_kl: float | None = None,
) -> tuple[bool, list[str]]:
    """Decide whether the policy passes: ``gate_metric >= min_improvement``, KL within ``max_kl``.

    A NaN metric fails the comparison it is in.

    Returns:
        ``(passed, reasons)``: one human-readable line per check.

    Raises:
        ConfigError: ``gate_metric`` is not in ``metrics`` (the message lists those that are),
            or ``max_kl`` is set and ``kl_policy_reference`` is missing.
    """
    if gate_metric not in metrics:
        available = ", ".join(sorted(k for k in metrics if k != "passed"))
        raise ConfigError(f"unknown gate_metric {gate_metric!r}; available: {available}")
    value = float(metrics[gate_metric])
    ok = value >= min_improvement
    relation = ">=" if ok else "<"
    reasons = [f"{gate_metric} = {value:.4g} {relation} min_improvement {min_improvement:.4g}"]
    if max_kl is not None:
        if KL_METRIC not in metrics:
            raise ConfigError(f"max_kl is set but the metrics hold no {KL_METRIC}")
        kl = float(metrics[KL_METRIC])
        kl_ok = kl <= max_kl
        relation = "<=" if kl_ok else ">"
        reasons.append(f"{KL_METRIC} = {kl:.4g} {relation} max_kl {max_kl:.4g}")
        ok = ok and kl_ok
    return ok, reasons


# -- generation ----------------------------------------------------------------------------------


def distinct_prompts(pairs: Sequence[Mapping[str, Any]], limit: int) -> list[Messages]:
    """The first ``limit`` distinct prompts of preference records, in their order."""
    seen: set[str] = set()
    prompts = []
    for record in pairs:
        key = prompt_key(dict(record), "preference")
        if key not in seen:
            seen.add(key)
            prompts.append([dict(m) for m in record["prompt"]])
        if len(prompts) == limit:
            break
    return prompts


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Messages) -> list[int]:
    """Token ids of a prompt rendered by the chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # The template writes BOS itself; the tokenizer must not add a second one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, completion: Messages
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its completion (the assistant messages, with end of turn).

    The conversation is rendered whole and split where the rendered prompt ends, so the
    completion carries exactly the tokens the template puts after the generation prompt.

    Raises:
        DataError: The chat template does not render the prompt as a prefix of the whole.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the chat template does not render the prompt as a prefix of prompt + response; "
            "evaluate with a tokenizer whose template keeps earlier turns unchanged"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    config: EvalStageConfig,
    top_k: int = 0,
    use_cache: bool = True,
) -> Generation:
    """Answer each prompt, in batches, left-padded, with the KV cache, from ``config.seed``.

    ``config`` may be any object with the sampling fields of :class:`EvalStageConfig`
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``seed``, ``batch_size``);
    ``top_k`` keeps only the k likeliest tokens when sampling (0 = off). ``use_cache=False``
    recomputes the whole sequence at every new token; it exists so that ``make bench`` can
    measure what the cache buys.

    Returns:
        The prompt ids, each response's ids up to and including the first end-of-turn token
        (all ``max_new_tokens`` when none came), and the responses decoded without special
        tokens.
    """
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": top_k}
    generation_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        use_cache=use_cache,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        **(sampling if config.do_sample else {}),
    )
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    # The model's own generation_config fills every setting left unset here (a repetition
    # penalty, a default temperature), differently for each model; swap it out while generating.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, inner.generation_config = inner.generation_config, generation_config
    try:
        response_ids = _generate(model, prompt_ids, generation_config, config)
    finally:
        inner.generation_config = saved
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    return Generation(prompt_ids, response_ids, texts)


def _generate(
    model: Any, prompt_ids: list[list[int]], generation_config: Any, config: EvalStageConfig
) -> list[list[int]]:
    import torch

    pad_id = generation_config.pad_token_id
    eos_ids = generation_config.eos_token_id
    response_ids: list[list[int]] = []
    # one seed per model run: the same config samples the same responses
    torch.manual_seed(config.seed)
    with torch.no_grad():
        for start in range(0, len(prompt_ids), config.batch_size):
            batch = prompt_ids[start : start + config.batch_size]
            width = max(len(ids) for ids in batch)
            # left padding: every prompt ends where generation starts
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            out = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                generation_config=generation_config,
            )
            response_ids += [_cut_at_eos(row, eos_ids) for row in out[:, width:].tolist()]
    return response_ids


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS plus any the model's generation config adds."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    ids += [i for i in configured or [] if i not in ids]
    if not ids:
        raise ModelError("neither the tokenizer nor the model names an EOS token; set eos_token")
    return ids


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for index, token in enumerate(row):
        if token in eos_ids:
            return row[: index + 1]
    return row


# -- log-probabilities ---------------------------------------------------------------------------


def completion_logprobs(
    model: PreTrainedModel,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    temperature: float = 1.0,
) -> list[float]:
    """Sum of ``log p(token | everything before it)`` over each completion's tokens.

    Args:
        model: A causal LM.
        sequences: ``(prompt_ids, completion_ids)`` pairs; the prompt must not be empty.
        batch_size: Sequences per forward pass (right-padded, so positions start at 0).
        temperature: Score under ``softmax(logits / temperature)``, the distribution a sampler
            at that temperature draws from (top-k/top-p truncation aside).

    Returns:
        One summed log-probability per sequence, in float64.
    """
    import torch

    if any(not prompt for prompt, _ in sequences):
        raise DataError("a sequence has an empty prompt; its first token has no context")
    sums: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)  # completion tokens
            for row, (prompt, completion) in enumerate(batch):
                tokens = [*prompt, *completion]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                scored[row, len(prompt) : len(tokens)] = True
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
            # a prompt-tuned model puts its virtual tokens in front: keep the last `width`
            # positions, those of the sequence itself
            logits = logits.logits[:, -width:]
            # logits at position t predict token t + 1: (batch, width - 1, vocab)
            logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
            targets = ids[:, 1:].to(logprobs.device)
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            picked = picked.double() * scored[:, 1:].to(picked.device)
            sums += picked.sum(dim=-1).tolist()
    return sums


def sequence_log_ratios(
    policy: PreTrainedModel, reference: PreTrainedModel, generation: Generation, batch_size: int
) -> list[float]:
    """Per response, ``log p_policy(y|x) - log p_ref(y|x)`` summed over the policy's tokens.

    Averaged over prompts this is ``kl_policy_reference``: the plain Monte Carlo ("k1")
    estimator of the sequence-level KL(policy || reference), unbiased when ``y`` is sampled from
    the policy itself (``do_sample=true``, temperature 1, top_p 1). Each term can be negative,
    and with greedy decoding (the default) the responses are the policy's modes, not samples,
    so the mean is a log-ratio on those responses rather than a KL and can be negative too:
    it is whenever the reference gives the policy's greedy answers more probability than the
    policy does. It is still the quantity to watch: it grows as the policy drifts.
    """
    sequences = list(zip(generation.prompt_ids, generation.response_ids, strict=True))
    policy_logps = completion_logprobs(policy, sequences, batch_size)
    reference_logps = completion_logprobs(reference, sequences, batch_size)
    return implicit_rewards(policy_logps, reference_logps)


def implicit_rewards(
    policy_logps: Sequence[float], reference_logps: Sequence[float]
) -> list[float]:
    """DPO's implicit reward without its beta: ``log p_policy(y|x) - log p_ref(y|x)`` each."""
    return [p - r for p, r in zip(policy_logps, reference_logps, strict=True)]


def preference_accuracy(
    chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]
) -> float:
    """Share of pairs whose chosen response has the strictly higher reward (ties count 0)."""
    if not chosen_rewards:
        raise DataError("no preference pairs to measure accuracy on")
    wins = sum(c > r for c, r in zip(chosen_rewards, rejected_rewards, strict=True))
    return wins / len(chosen_rewards)


def pair_rewards(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Mapping[str, Any]],
    batch_size: int,
) -> tuple[list[float], list[float]]:
    """Implicit rewards of the chosen and of the rejected response of each preference pair."""
    chosen = [encode_completion(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [encode_completion(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    rewards = []
    for sequences in (chosen, rejected):
        policy_logps = completion_logprobs(policy, sequences, batch_size)
        reference_logps = completion_logprobs(reference, sequences, batch_size)
        rewards.append(implicit_rewards(policy_logps, reference_logps))
    return rewards[0], rewards[1]


def _perplexities(
    policy: Any, reference: Any, tokenizer: Any, conversations: list[dict], config: EvalStageConfig
) -> dict[str, float]:
    """Perplexity of each model on the last assistant turn of each conversation."""
    sequences = []
    for record in conversations:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        sequences.append(encode_completion(tokenizer, messages[:last], [messages[last]]))
    tokens = sum(len(c) for _, c in sequences)
    result = {}
    for side, model in (("policy", policy), ("reference", reference)):
        total = sum(completion_logprobs(model, sequences, config.batch_size))
        result[f"perplexity_{side}"] = perplexity(-total / tokens)
    return result


# -- few-shot baseline ---------------------------------------------------------------------------


def few_shot_prompts(
    examples: Sequence[Messages], prompts: Sequence[Messages], k: int, seed: int
) -> list[Messages]:
    """Each prompt preceded by ``k`` example conversations, drawn without repeats per prompt.

    The draws come from one ``random.Random(seed)`` in prompt order, so a seed repeats them.

    Raises:
        DataError: There are fewer than ``k`` examples.
    """
    if len(examples) < k:
        raise DataError(f"few_shot={k} needs at least {k} SFT conversations, got {len(examples)}")
    rng = random.Random(seed)
    shots = []
    for prompt in prompts:
        drawn = rng.sample(range(len(examples)), k)
        shots.append([dict(m) for i in drawn for m in examples[i]] + [dict(m) for m in prompt])
    return shots


def few_shot_baseline(
    config: EvalStageConfig,
    tokenizer: PreTrainedTokenizerBase,
    reference: PreTrainedModel,
    prompts: list[Messages],
    reference_gen: Generation,
    scorers: Mapping[str, Scorer],
) -> dict[str, tuple[Generation, dict[str, list[float]]]]:
    """The base model's answers and scores, plain (``base``) and with examples (``few_shot``).

    The examples are SFT conversations from ``config.sft_data``'s train split; the answers are
    scored against the plain prompts, as the policy's are.
    """
    if config.base_model is None:
        base, plain = reference, reference_gen
    else:
        base = _load_base(config, tokenizer)
        plain = generate_responses(base, tokenizer, prompts, config)
    examples = [r["messages"] for r in _read_split(config.sft_data, "train")]
    shots = few_shot_prompts(examples, prompts, config.few_shot, config.few_shot_seed)
    log.info("few-shot baseline: %d examples in front of each prompt", config.few_shot)
    prompted = generate_responses(base, tokenizer, shots, config)
    return {
        side: (gen, {name: scorer.score(prompts, gen.texts) for name, scorer in scorers.items()})
        for side, gen in (("base", plain), ("few_shot", prompted))
    }


def _with_few_shot(
    metrics: Mapping[str, float],
    baseline: Mapping[str, tuple[Generation, dict[str, list[float]]]],
    samples: list[dict[str, Any]],
    scorer_names: Sequence[str],
) -> dict[str, float]:
    """Mean reward of each baseline, the policy's gain over few-shot; answers into the samples."""
    extra: dict[str, float] = {}
    for side, (gen, scores) in baseline.items():
        for name in scorer_names:
            extra[f"{name}_reward_{side}"] = sum(scores[name]) / len(scores[name])
            for sample, score in zip(samples, scores[name], strict=True):
                sample["scores"][name][side] = score
        for sample, text in zip(samples, gen.texts, strict=True):
            sample[side] = text
    extra["response_tokens_few_shot_mean"] = sum(map(len, baseline["few_shot"][0].response_ids)) / (
        len(samples)
    )
    for name in scorer_names:
        gain = metrics[f"{name}_reward_policy"] - extra[f"{name}_reward_few_shot"]
        extra[f"{name}_gain_over_few_shot"] = gain
    return extra


def _load_base(config: EvalStageConfig, tokenizer: Any) -> Any:
    """The few-shot baseline's model, checked to share the policy's tokenizer."""
    import torch

    from alignpipe import models

    path = models.resolve_model(config.base_model)
    if models.load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            "base_model has another tokenizer than the policy; give the model the policy was "
            "fine-tuned from"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return models.load_causal_lm(path).to(device).eval()


# -- scoring and comparing -----------------------------------------------------------------------


def _compare(
    scorers: Mapping[str, Scorer],
    prompts: list[Messages],
    policy: Generation,
    reference: Generation,
    log_ratios: list[float],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-scorer reward means, delta and win rate; lengths; KL; one sample per prompt."""
    n = len(prompts)
    metrics: dict[str, float] = {}
    samples = [
        {
            "prompt": prompt,
            "policy": policy.texts[i],
            "reference": reference.texts[i],
            "policy_tokens": len(policy.response_ids[i]),
            "reference_tokens": len(reference.response_ids[i]),
            "policy_log_ratio": log_ratios[i],
            "scores": {},
        }
        for i, prompt in enumerate(prompts)
    ]
    for name, scorer in scorers.items():
        ours = scorer.score(prompts, policy.texts)
        theirs = scorer.score(prompts, reference.texts)
        metrics[f"{name}_reward_policy"] = sum(ours) / n
        metrics[f"{name}_reward_reference"] = sum(theirs) / n
        metrics[f"{name}_reward_delta"] = (sum(ours) - sum(theirs)) / n
        # a tie is half a win, so identical models score exactly 0.5
        wins = sum(
            1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)
        )
        metrics[f"{name}_win_rate"] = wins / n
        for sample, a, b in zip(samples, ours, theirs, strict=True):
            sample["scores"][name] = {"policy": a, "reference": b}
    metrics["response_tokens_policy_mean"] = sum(map(len, policy.response_ids)) / n
    metrics["response_tokens_reference_mean"] = sum(map(len, reference.response_ids)) / n
    metrics[KL_METRIC] = sum(log_ratios) / n
    return metrics, samples


# -- loading -------------------------------------------------------------------------------------


def _read_split(folder: str, split: str) -> list[dict]:
    """One split of a prep output folder (the few-shot examples come from ``train``)."""
    uri = split_uri(folder, split)
    records, _ = read_stage_split(folder, split, "pass a prep output folder as sft_data")
    if not records or "messages" not in records[0]:
        raise DataError(f"{uri} holds no conversations; pass a prep output folder as sft_data")
    return records


def _read_eval(folder: str, shape: str, limit: int | None, tracker: Tracker) -> list[dict]:
    """The eval split of a data stage's output folder, recorded as a dataset of the run."""
    import pyarrow.parquet as pq

    uri = f"{folder.rstrip('/')}/eval.parquet"
    with storage.local_path(uri) as path:
        records = pq.read_table(path).to_pylist()
        digest = fingerprint_file(path)
    if not records:
        stage = "ingest" if shape == "preference" else "prep"
        raise DataError(f"{uri} holds no records; rerun {stage} with eval_fraction > 0")
    field_name = "prompt" if shape == "preference" else "messages"
    if field_name not in records[0]:
        stage = "an ingest" if shape == "preference" else "a prep"
        raise DataError(f"{uri} holds no {field_name} column; pass {stage} output folder")
    tracker.log_dataset(f"{shape}-eval", uri, digest, "eval", num_rows=len(records))
    return records[:limit] if limit is not None else records


def _load_models(config: EvalStageConfig) -> tuple[Any, Any, Any]:
    """The policy's tokenizer (checked to match the reference's) and both models, in eval mode."""
    import torch

    from alignpipe import models

    # resolve once: an s3:// reference is downloaded by each resolve
    policy_path, reference_path = (
        models.resolve_model(r) for r in (config.policy, config.reference)
    )
    tokenizer = models.load_tokenizer(policy_path)
    if not tokenizer.chat_template:
        raise ModelError(
            f"the tokenizer of {config.policy} has no chat template; evaluate a chat model, or "
            "save the tokenizer with one (models.train_tokenizer writes one)"
        )
    if models.load_tokenizer(reference_path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            "policy and reference tokenizers differ; KL and implicit rewards compare token "
            "log-probs, so evaluate a policy against the model it was trained from"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = [models.load_causal_lm(p).to(device).eval() for p in (policy_path, reference_path)]
    return tokenizer, loaded[0], loaded[1]


# -- outputs -------------------------------------------------------------------------------------


def _write_outputs(
    out: Path,
    config: EvalStageConfig,
    metrics: dict[str, float],
    samples: list[dict[str, Any]],
    passed: bool,
    reasons: list[str],
) -> Path:
    """Write metrics.json, samples.jsonl, the plot, report.md and report.html; return report.md."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    png = plot_rewards(samples, config.scorers, out / PLOT_FILE)
    blocks = _report_blocks(config, metrics, samples, passed, reasons, png)
    (out / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
    return out / "report.md"


def _log_outputs(tracker: Tracker, out: Path, metrics: dict[str, float], passed: bool) -> None:
    tracker.log_metrics(metrics)
    tracker.log_dict(metrics, "metrics.json")
    tracker.set_tags({GATE_TAG: "passed" if passed else "failed"})
    for name in ("report.md", "report.html", PLOT_FILE, "samples.jsonl"):
        tracker.log_artifact(out / name)


def plot_rewards(samples: list[dict[str, Any]], scorers: Sequence[str], dest: Path) -> bytes:
    """Histogram of per-prompt rewards of both sides, one panel per scorer; returns the PNG."""
    # pyplot is avoided: it keeps global figures and picks a GUI backend; Figure renders on Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(scorers), 3.2), layout="constrained")
    axes = fig.subplots(1, len(scorers), squeeze=False)[0]
    for ax, name in zip(axes, scorers, strict=True):
        sides = [[s["scores"][name][side] for s in samples] for side in ("policy", "reference")]
        ax.hist(sides, bins=20, label=["policy", "reference"], color=["tab:blue", "tab:gray"])
        ax.set_xlabel(f"{name} reward per prompt")
        ax.set_ylabel("prompts")
        ax.legend()
    fig.savefig(dest, format="png", dpi=100)
    return dest.read_bytes()


@dataclass
class _Block:
    kind: str  # h1, h2, p, list, table, image
    text: str = ""
    items: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)  # first row is the header


def _report_blocks(
    config: EvalStageConfig,
    metrics: dict[str, float],
    samples: list[dict[str, Any]],
    passed: bool,
    reasons: list[str],
    png: bytes,
) -> list[_Block]:
    decoding = "sampled" if config.do_sample else "greedy"
    headline = [["metric", "policy", "reference", "policy − reference"]]
    for name in config.scorers:
        ours, theirs = metrics[f"{name}_reward_policy"], metrics[f"{name}_reward_reference"]
        headline.append([f"{name} reward (mean)", _num(ours), _num(theirs), _num(ours - theirs)])
        win = metrics[f"{name}_win_rate"]
        headline.append([f"{name} win rate (ties count half)", _num(win), _num(1 - win), ""])
    for label, key in (("response tokens (mean)", "response_tokens"), ("perplexity", "perplexity")):
        if f"{key}_policy" in metrics or f"{key}_policy_mean" in metrics:
            suffix = "_mean" if key == "response_tokens" else ""
            ours, theirs = metrics[f"{key}_policy{suffix}"], metrics[f"{key}_reference{suffix}"]
            headline.append([label, _num(ours), _num(theirs), _num(ours - theirs)])
    prompting = []
    if config.few_shot:
        k = config.few_shot
        prompting = [["scorer", "base", f"base, {k}-shot", "fine-tuned", "fine-tuned − few-shot"]]
        for name in config.scorers:
            row = [metrics[f"{name}_reward_{side}"] for side in ("base", "few_shot", "policy")]
            prompting.append([name, *map(_num, row), _num(metrics[f"{name}_gain_over_few_shot"])])
    first = config.scorers[0]
    shown = [["prompt", "policy", "reference", f"{first} policy", f"{first} reference"]]
    for s in samples[:5]:
        score = s["scores"][first]
        prompt = s["prompt"][-1]["content"]
        shown.append(
            [prompt, s["policy"], s["reference"], _num(score["policy"]), _num(score["reference"])]
        )
    image = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return [
        _Block("h1", "Evaluation: policy vs reference"),
        _Block(
            "list",
            items=[
                f"policy: `{config.policy}`",
                f"reference: `{config.reference}`",
                f"{len(samples)} prompts, {decoding} decoding, at most {config.max_new_tokens} "
                f"new tokens, seed {config.seed}",
            ],
        ),
        _Block("h2", f"Gate: {'PASSED' if passed else 'FAILED'}"),
        _Block("list", items=reasons),
        _Block("h2", "Headline"),
        _Block("table", rows=headline),
        *_prompting_blocks(config, prompting),
        _Block("h2", "All metrics"),
        _Block("table", rows=[["metric", "value"]] + [[k, _num(v)] for k, v in metrics.items()]),
        _Block("h2", "Reward per prompt"),
        _Block("image", text=f"{first} reward histogram", items=[image]),
        _Block("h2", "Sample responses"),
        _Block("table", rows=shown),
    ]


def _prompting_blocks(config: EvalStageConfig, rows: list[list[str]]) -> list[_Block]:
    """The few-shot comparison: mean reward of base, base with examples, and the policy."""
    if not rows:
        return []
    base = config.base_model or config.reference
    note = (
        f"Mean reward per scorer. base = `{base}` answering the plain prompt; few-shot = the "
        f"same model with {config.few_shot} training conversations in front (seed "
        f"{config.few_shot_seed}); fine-tuned = `{config.policy}`."
    )
    return [
        _Block("h2", "Fine-tuning vs prompting"),
        _Block("list", items=[note]),
        _Block("table", rows=rows),
    ]


def render_markdown(blocks: list[_Block]) -> str:
    """The report as Markdown (the KFP UI renders it, images included, from data URIs)."""
    lines: list[str] = []
    for block in blocks:
        if block.kind == "h1":
            lines += [f"# {block.text}", ""]
        elif block.kind == "h2":
            lines += [f"## {block.text}", ""]
        elif block.kind == "list":
            lines += [f"- {item}" for item in block.items] + [""]
        elif block.kind == "table":
            header, *body = block.rows
            lines.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            lines.append("")
        elif block.kind == "image":
            lines += [f"![{block.text}]({block.items[0]})", ""]
    return "\n".join(lines)


def render_html(blocks: list[_Block]) -> str:
    """The report as a standalone HTML page."""
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Evaluation</title>']
    parts.append(
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style>"
    )
    parts.append("</head><body>")
    for block in blocks:
        if block.kind in ("h1", "h2"):
            parts.append(f"<{block.kind}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "list":
            items = "".join(f"<li>{_html_inline(i)}</li>" for i in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif block.kind == "table":
            header, *body = block.rows
            head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in body
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif block.kind == "image":
            parts.append(f'<img alt="{html.escape(block.text)}" src="{block.items[0]}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _num(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _html_inline(text: str) -> str:
    # the report's lists use `code` spans for model references
    escaped = html.escape(text)
    pieces = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))
