"""A built-in task with a known gold preference rule, for the demo and the training tests.

Prompts ask for a number of things of a category ("Name three fruits."); a response is a
comma-separated list ("apple, pear, plum."). Because the gold reward is a fixed rule, what
alignment achieved can be measured exactly; demonstrations come from a noisy behaviour policy and
preference votes from simulated annotators who follow the rule with Bradley–Terry noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.config import option
from alignpipe.data.records import message
from alignpipe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# plural (as asked for two or more) -> (singular, members); members are unique across categories
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fruits": (
        "fruit",
        ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "banana", "melon"),
    ),
    "animals": (
        "animal",
        ("dog", "cat", "horse", "cow", "sheep", "goat", "mouse", "tiger", "lion", "bear"),
    ),
    "colors": (
        "color",
        ("red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "gray"),
    ),
    "tools": (
        "tool",
        ("hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "chisel", "pliers", "ladder"),
    ),
    "vegetables": (
        "vegetable",
        (
            "carrot",
            "potato",
            "onion",
            "pea",
            "bean",
            "cabbage",
            "leek",
            "spinach",
            "celery",
            "radish",
        ),
    ),
    "instruments": (
        "instrument",
        ("piano", "guitar", "violin", "drum", "flute", "harp", "trumpet", "cello", "banjo", "oboe"),
    ),
}
COUNTS = ("one", "two", "three", "four")
TEMPLATES = ("Name {count} {category}.", "List {count} {category}.", "Give me {count} {category}.")
# Openings that do not change what is asked; they multiply the distinct prompts (72 -> 576) so a
# held-out split by prompt still has enough prompts to evaluate on.
LEADS = ("", "Please", "Now", "Kindly", "Hey,", "Okay,", "Quickly,", "Hello.")
MAX_REWARD = 1.0
RULE = (
    "A prompt asks for n things of a category; the response is a comma-separated list ending "
    "with a period. reward = (min(correct, n) - wrong - 0.5 * |items - n|) / n, minus 0.25 when "
    "the final period is missing, clipped to [-1, 1]; correct = distinct items of the category, "
    "wrong = items of another category or unknown plus repeats of an earlier item; a response "
    "with no items scores -1. A perfect answer scores 1."
)

_PROMPT = re.compile(
    r"^\s*(?:(?:please|now|kindly|hey,|okay,|quickly,|hello\.)\s+)?"
    r"(?:name|list|give me)\s+([a-z]+)\s+([a-z]+)\s*\.?\s*$",
    re.IGNORECASE,
)
_CATEGORY_BY_WORD = {
    w: plural for plural, (single, _) in CATEGORIES.items() for w in (plural, single)
}
_ALL_MEMBERS = tuple(m for _, members in CATEGORIES.values() for m in members)


@dataclass
class SyntheticTaskOptions:
    """How much data the synthetic task generates and how noisy its policy and annotators are."""

    seed: int = option(0, help="seed of every random choice; same seed, same files")
    num_sft: int = option(2000, help="demonstrations (prompt + behaviour-policy response) for SFT")
    num_prompts: int = option(256, help="prompts without responses, for PPO rollouts and eval")
    num_pairs: int = option(1000, help="response pairs judged by the simulated annotators")
    annotators: int = option(3, help="simulated annotators judging every pair")
    temperature: float = option(
        0.1,
        help="Bradley–Terry temperature: P(a preferred) = sigmoid((r_a - r_b) / temperature); "
        "lower is more decisive",
    )
    noise: float = option(0.1, help="probability that an annotator flips a decisive choice")
    tie_margin: float = option(
        0.05, help="an annotator says 'tie' when the gold rewards differ by at most this much"
    )
    quality: float = option(
        0.5,
        help="behaviour policy: probability that each choice (the item count, each item) is "
        "right; below 1 leaves the SFT model room to improve",
    )

    def __post_init__(self) -> None:
        for name in ("num_sft", "num_prompts", "num_pairs", "annotators"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0, got {self.temperature}; use a small value such as "
                "0.01 for near-deterministic annotators"
            )
        if not 0 <= self.noise <= 0.5:
            raise ConfigError(
                f"noise must be in [0, 0.5], got {self.noise}; above 0.5 annotators prefer the "
                "worse response, so lower it"
            )
        if self.tie_margin < 0:
            raise ConfigError(f"tie_margin must be >= 0, got {self.tie_margin}; use 0 for no ties")
        if not 0 <= self.quality <= 1:
            raise ConfigError(f"quality must be in [0, 1], got {self.quality}")


def gold_reward(prompt: str | Sequence[Mapping[str, str]], response: str) -> float:
    """Score a response to a task prompt by the gold rule (see :data:`RULE`).

    Worked examples for "Name three fruits.": "apple, pear, plum." scores 1; "apple, pear."
    scores (2 - 0 - 0.5) / 3 = 0.5; "apple, dog, apple." scores (1 - 2 - 0) / 3 = -1/3.

    Args:
        prompt: the prompt text, or its messages (the last user message is used).
        response: the response text.

    Returns:
        The reward in [-1, 1].

    Raises:
        DataError: the prompt is not one of this task's prompts.
    """
    count, category = _parse_prompt(prompt)
    text = response.strip()
    period = text.endswith(".")
    if period:
        text = text[:-1]
    items = [w.strip().lower() for w in text.split(",")]
    items = [w for w in items if w]
    if not items:
        return -1.0
    members = set(CATEGORIES[category][1])
    seen: set[str] = set()
    correct = wrong = 0
    for item in items:
        if item in members and item not in seen:
            correct += 1
        else:
            wrong += 1
        seen.add(item)
    score = (min(correct, count) - wrong - 0.5 * abs(len(items) - count)) / count
    if not period:
        score -= 0.25
    return max(-1.0, min(1.0, score))


def sample_response(prompt: str, rng: random.Random, quality: float) -> str:
    """Draw a response from the behaviour policy.

    The item count is right with probability ``quality`` (else off by one); each item is a fresh
    member of the asked category with probability ``quality``, else a repeat of an earlier item
    (30%) or a member of another category.

    Args:
        prompt: a task prompt.
        rng: the random source (seeded by the caller).
        quality: probability of each right choice, in [0, 1].

    Returns:
        The response text, e.g. ``"apple, dog, plum."``.
    """
    if not 0 <= quality <= 1:
        raise ConfigError(f"quality must be in [0, 1], got {quality}")
    count, category = _parse_prompt(prompt)
    members = CATEGORIES[category][1]
    others = [m for m in _ALL_MEMBERS if m not in members]
    size = count
    if rng.random() >= quality:
        size = rng.choice([c for c in (count - 1, count + 1) if 1 <= c <= len(COUNTS) + 1])
    items: list[str] = []
    for _ in range(size):
        if rng.random() < quality:
            items.append(rng.choice([m for m in members if m not in items]))
        elif items and rng.random() < 0.3:
            items.append(rng.choice(items))
        else:
            items.append(rng.choice(others))
    return ", ".join(items) + "."


def generate_sft(options: SyntheticTaskOptions) -> list[dict[str, Any]]:
    """Generate demonstrations: conversation records ``{"messages", "task": "synthetic"}``."""
    rng = random.Random(f"{options.seed}:sft")
    records = []
    for _ in range(options.num_sft):
        prompt = _sample_prompt(rng)
        response = sample_response(prompt, rng, options.quality)
        messages = [message("user", prompt), message("assistant", response)]
        records.append({"messages": messages, "task": "synthetic"})
    return records


def generate_prompts(options: SyntheticTaskOptions) -> list[dict[str, Any]]:
    """Generate prompt-only records ``{"prompt": [user message]}`` for rollouts and evaluation.

    They are fresh draws from the prompt distribution; with 576 distinct prompts in the task
    some repeat prompts of the SFT data.
    """
    rng = random.Random(f"{options.seed}:prompts")
    return [{"prompt": [message("user", _sample_prompt(rng))]} for _ in range(options.num_prompts)]


def generate_votes(options: SyntheticTaskOptions) -> list[dict[str, Any]]:
    """Generate pairwise votes in the ``votes`` annotation export layout.

    Each item is a prompt with two different behaviour-policy responses, judged by every
    annotator: "tie" when the gold rewards differ by at most ``tie_margin``, else "a" with
    probability sigmoid((r_a - r_b) / temperature), then flipped with probability ``noise``.

    Returns:
        Rows ``{"item_id", "prompt", "response_a", "response_b", "choice", "annotator"}``,
        ``options.annotators`` rows per item.
    """
    rng = random.Random(f"{options.seed}:votes")
    rows = []
    for index in range(options.num_pairs):
        prompt = _sample_prompt(rng)
        first = sample_response(prompt, rng, options.quality)
        second = first
        while second == first:
            second = sample_response(prompt, rng, options.quality)
        diff = gold_reward(prompt, first) - gold_reward(prompt, second)
        for annotator in range(options.annotators):
            rows.append(
                {
                    "item_id": f"syn-{index:05d}",
                    "prompt": prompt,
                    "response_a": first,
                    "response_b": second,
                    "choice": _judge(diff, rng, options),
                    "annotator": f"annotator-{annotator + 1}",
                }
            )
    return rows


def write_task(options: SyntheticTaskOptions, out_dir: str | Path) -> dict[str, Path]:
    """Write the task's files to a local folder.

    Args:
        options: what to generate.
        out_dir: the folder; created when missing.

    Returns:
        Paths by name: ``sft`` (sft.jsonl), ``prompts`` (prompts.jsonl), ``votes``
        (votes.jsonl) and ``task`` (task.json: the options, the rule and the row counts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "sft": generate_sft(options),
        "prompts": generate_prompts(options),
        "votes": generate_votes(options),
    }
    paths = {name: out / f"{name}.jsonl" for name in data}
    for name, rows in data.items():
        with paths[name].open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    paths["task"] = out / "task.json"
    task = {
        "task": "synthetic",
        "options": dataclasses.asdict(options),
        "rule": RULE,
        "max_reward": MAX_REWARD,
        "rows": {name: len(rows) for name, rows in data.items()},
    }
    paths["task"].write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    logger.info("synthetic task written to %s: %s", out, task["rows"])
    return paths


def corpus(options: SyntheticTaskOptions) -> Iterator[str]:
    """Yield every text of the task, for training its tiny tokenizer.

    Besides the generated prompts and responses, every prompt form and every category's full
    member list are included, so a response the policy never sampled still tokenizes to words.
    """
    for template in TEMPLATES:
        for number, count in enumerate(COUNTS, start=1):
            for plural, (single, _members) in CATEGORIES.items():
                yield template.format(count=count, category=single if number == 1 else plural)
    yield " ".join(lead for lead in LEADS if lead)
    for _, members in CATEGORIES.values():
        yield ", ".join(members) + "."
    for record in generate_sft(options):
        for msg in record["messages"]:
            yield msg["content"]
    for record in generate_prompts(options):
        yield record["prompt"][0]["content"]
    for row in generate_votes(options):
        if row["annotator"] == "annotator-1":  # every annotator sees the same texts
            yield row["prompt"]
            yield row["response_a"]
            yield row["response_b"]


def _sample_prompt(rng: random.Random) -> str:
    number = rng.randint(1, len(COUNTS))
    plural = rng.choice(list(CATEGORIES))
    category = CATEGORIES[plural][0] if number == 1 else plural
    text = rng.choice(TEMPLATES).format(count=COUNTS[number - 1], category=category)
    lead = rng.choice(LEADS)
    return f"{lead} {text[0].lower()}{text[1:]}" if lead else text


def _parse_prompt(prompt: str | Sequence[Mapping[str, str]]) -> tuple[int, str]:
    """Return (count, plural category) asked for by a task prompt."""
    if not isinstance(prompt, str):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    match = _PROMPT.match(prompt)
    count = match.group(1).lower() if match else ""
    category = _CATEGORY_BY_WORD.get(match.group(2).lower()) if match else None
    if count not in COUNTS or category is None:
        raise DataError(
            f"prompt {prompt!r} is not a synthetic-task prompt; use one like 'Name three fruits.'"
        )
    return COUNTS.index(count) + 1, category


def _judge(diff: float, rng: random.Random, options: SyntheticTaskOptions) -> str:
    """One simulated annotator's choice given r_a - r_b."""
    if abs(diff) <= options.tie_margin:
        return "tie"
    # logistic via tanh: no overflow for large |diff| / temperature
    p_first = 0.5 * (1.0 + math.tanh(diff / options.temperature / 2))
    choice = "a" if rng.random() < p_first else "b"
    if rng.random() < options.noise:
        choice = "b" if choice == "a" else "a"
    return choice
