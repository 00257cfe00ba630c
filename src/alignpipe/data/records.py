"""The canonical record shapes every layout is normalized to.

Records are plain dicts so they move through ``datasets`` and Parquet unchanged. A message is
``{"role": "system" | "user" | "assistant", "content": str}``.

- conversation: ``messages`` (list of messages), optional ``task``.
- preference: ``prompt`` (messages ending with a user turn), ``chosen`` and ``rejected`` (lists of
  assistant messages), optional ``margin`` (float), ``annotator`` and ``source`` (str).
- feedback: ``prompt`` (messages), ``completion`` (assistant messages), ``label`` (bool).
- text_pair: ``anchor`` and ``positive`` (str), optional ``negative`` (str) or ``score`` (float).

Optional fields are always present (``None`` when unknown) so every file of a shape has one
schema.
"""

from __future__ import annotations

from typing import Any, Literal

Shape = Literal["conversation", "preference", "feedback", "text_pair"]
SHAPES: tuple[Shape, ...] = ("conversation", "preference", "feedback", "text_pair")
ROLES = ("system", "user", "assistant")

# Every field of each shape, in column order; optional fields default to None.
FIELDS: dict[str, dict[str, bool]] = {
    "conversation": {"messages": True, "task": False},
    "preference": {
        "prompt": True,
        "chosen": True,
        "rejected": True,
        "margin": False,
        "annotator": False,
        "source": False,
    },
    "feedback": {"prompt": True, "completion": True, "label": True},
    "text_pair": {"anchor": True, "positive": True, "negative": False, "score": False},
}


def message(role: str, content: str) -> dict[str, str]:
    """Build one chat message."""
    return {"role": role, "content": content}


def complete(record: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """Return ``record`` with every field of ``shape``, in order, optional ones as ``None``."""
    return {name: record.get(name) for name in FIELDS[shape]}


def arrow_schema(shape: Shape):
    """The Parquet schema of a shape, so that every file of a shape (even an empty one) agrees."""
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    columns = {
        "conversation": [("messages", messages), ("task", pa.string())],
        "preference": [
            ("prompt", messages),
            ("chosen", messages),
            ("rejected", messages),
            ("margin", pa.float64()),
            ("annotator", pa.string()),
            ("source", pa.string()),
        ],
        "feedback": [("prompt", messages), ("completion", messages), ("label", pa.bool_())],
        "text_pair": [
            ("anchor", pa.string()),
            ("positive", pa.string()),
            ("negative", pa.string()),
            ("score", pa.float64()),
        ],
    }[shape]
    return pa.schema(columns)


def prompt_key(record: dict[str, Any], shape: Shape) -> str:
    """A string identifying what a record conditions on, for grouping, splits and leakage checks.

    Records with the same key must land on the same side of a train/eval split: two preference
    pairs on one prompt, or a conversation and its continuation, teach the same thing.
    """
    if shape == "conversation":
        turns = record["messages"]
        last_assistant = max(
            (i for i, m in enumerate(turns) if m["role"] == "assistant"), default=len(turns)
        )
        context = turns[:last_assistant]
    elif shape in ("preference", "feedback"):
        context = record["prompt"]
    else:
        return record["anchor"].strip()
    return "\x1e".join(f"{m['role']}\x1f{m['content'].strip()}" for m in context)
