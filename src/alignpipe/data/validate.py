"""Checks that decide which canonical records are kept and which are quarantined.

Each check returns a reason when a record is unusable; nothing is dropped without one. The
checks that need a tokenizer (length in tokens, the chat-template round trip) run only when the
stage is given one, and the stats say so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignpipe.data.records import ROLES, Shape, prompt_key


@dataclass
class Candidate:
    """A normalized record with where it came from."""

    record: dict[str, Any]
    source: str
    lines: list[int]


@dataclass
class Quarantined:
    """A row or record that was not kept, with the check that stopped it and why."""

    source: str
    lines: list[int]
    check: str
    reason: str
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        line = self.lines[0] if len(self.lines) == 1 else None
        entry = {"source": self.source, "line": line, "lines": self.lines}
        entry |= {"check": self.check, "reason": self.reason, "data": self.data}
        return entry


@dataclass
class ValidationReport:
    kept: list[Candidate] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)


def check_structure(record: dict[str, Any], shape: Shape) -> str | None:
    """Return why a record's content is unusable for its shape, or None."""
    if shape == "conversation":
        messages = record["messages"]
        if problem := _check_messages(messages, "messages"):
            return problem
        if not any(m["role"] == "assistant" for m in messages):
            return "conversation has no assistant turn to learn from"
        if messages[-1]["role"] != "assistant":
            return "conversation must end with an assistant turn"
        return None
    if shape in ("preference", "feedback"):
        prompt = record["prompt"]
        if problem := _check_messages(prompt, "prompt"):
            return problem
        if prompt[-1]["role"] != "user":
            return "prompt must end with a user turn"
        sides = ("chosen", "rejected") if shape == "preference" else ("completion",)
        for side in sides:
            if problem := _check_messages(record[side], side):
                return problem
            if any(m["role"] != "assistant" for m in record[side]):
                return f"{side} must hold only assistant turns"
        if shape == "preference" and _text(record["chosen"]) == _text(record["rejected"]):
            return "chosen and rejected are identical"
        return None
    # text pairs
    for name in ("anchor", "positive"):
        if not (record.get(name) or "").strip():
            return f"empty {name}"
    if record.get("negative") is not None and not record["negative"].strip():
        return "empty negative"
    return None


def validate(
    candidates: Iterable[Candidate],
    shape: Shape,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    dedupe: bool = True,
) -> ValidationReport:
    """Run every per-record check, then duplicates; keep the first of each duplicate group."""
    report = ValidationReport()
    first_seen: dict[str, Candidate] = {}
    for cand in candidates:
        problem = check_structure(cand.record, shape)
        check = "structure"
        if problem is None and tokenizer is not None:
            problem, length = _check_tokens(cand.record, shape, tokenizer, max_length)
            check = "length" if problem and problem.startswith("too long") else "template"
        if problem is None and dedupe:
            key = content_key(cand.record, shape)
            if key in first_seen:
                problem = f"duplicate of line {first_seen[key].lines[0]}"
                check = "duplicate"
            else:
                first_seen[key] = cand
        if problem is not None:
            report.quarantined.append(
                Quarantined(cand.source, cand.lines, check, problem, cand.record)
            )
            continue
        report.kept.append(cand)
        if tokenizer is not None:
            report.token_lengths.append(length)
    return report


def remove_leakage(
    train: Sequence[Candidate], eval_: Sequence[Candidate], shape: Shape
) -> tuple[list[Candidate], list[Quarantined]]:
    """Quarantine eval records whose prompt also appears in the training split."""
    train_keys = {prompt_key(c.record, shape) for c in train}
    kept, leaked = [], []
    for cand in eval_:
        if prompt_key(cand.record, shape) in train_keys:
            leaked.append(
                Quarantined(
                    cand.source,
                    cand.lines,
                    "leakage",
                    "eval prompt also appears in the training data",
                    cand.record,
                )
            )
        else:
            kept.append(cand)
    return kept, leaked


def content_key(record: dict[str, Any], shape: Shape) -> str:
    """A canonical string of the fields that make two records the same training example."""
    fields = {
        "conversation": ("messages",),
        "preference": ("prompt", "chosen", "rejected"),
        "feedback": ("prompt", "completion", "label"),
        "text_pair": ("anchor", "positive", "negative"),
    }[shape]
    return json.dumps([record[f] for f in fields], sort_keys=True, ensure_ascii=False)


def _check_messages(messages: Any, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{name} has no messages"
    for m in messages:
        if m.get("role") not in ROLES:
            return f"{name} has an unknown role {m.get('role')!r}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"{name} has an empty {m.get('role')} message"
    return None


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"].strip() for m in messages)


def _conversations(record: dict[str, Any], shape: Shape) -> list[tuple[list, list]]:
    """Split a record into (prompt, response) message lists, one per trained response."""
    if shape == "conversation":
        messages = record["messages"]
        return [(messages[:i], [m]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    sides = ("chosen", "rejected") if shape == "preference" else ("completion",)
    return [(record["prompt"], record[side]) for side in sides]


def _check_tokens(
    record: dict[str, Any], shape: Shape, tokenizer: Any, max_length: int | None
) -> tuple[str | None, int]:
    """Chat-template round trip and length in tokens; returns (problem, longest length)."""
    if shape == "text_pair":
        lengths = [
            len(tokenizer(record[k], add_special_tokens=False)["input_ids"])
            for k in ("anchor", "positive", "negative")
            if record.get(k)
        ]
        longest = max(lengths)
        if max_length is not None and longest > max_length:
            return f"too long: {longest} tokens > max_length {max_length}", longest
        return None, longest

    longest = 0
    for prompt, response in _conversations(record, shape):
        if not prompt:
            continue  # an opening assistant turn has no prompt to be a prefix of
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
        full_ids = _ids(tokenizer.apply_chat_template(prompt + response))
        longest = max(longest, len(full_ids))
        if full_ids[: len(prompt_ids)] != prompt_ids:
            return "chat template: prompt tokens are not a prefix of prompt + response", longest
        if problem := _doubled_special(full_ids, tokenizer):
            return problem, longest
    if max_length is not None and longest > max_length:
        return f"too long: {longest} tokens > max_length {max_length}", longest
    return None, longest


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a dict-like encoding from apply_chat_template(tokenize=True)
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _doubled_special(ids: list[int], tokenizer: Any) -> str | None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        return "chat template: doubled BOS token at the start"
    if eos is not None and len(ids) > 1 and ids[-1] == eos and ids[-2] == eos:
        return "chat template: doubled EOS token at the end"
    return None
