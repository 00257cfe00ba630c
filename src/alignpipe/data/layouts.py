"""Recognise the layout of parsed rows and normalize them to the canonical record shapes.

A layout is a known way of writing training data (HH-RLHF transcripts, TRL preference columns,
OpenAI chat, ShareGPT, Alpaca, ...). :func:`detect_layout` picks one from the first rows;
:func:`normalize` turns one row into canonical records (see :mod:`alignpipe.data.records`) or
raises :class:`RowError` with the reason the row goes to quarantine. Checks across rows
(duplicates, identical chosen/rejected, lengths, leakage) belong to the validation step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignpipe.data.records import ROLES, Shape, complete, message
from alignpipe.errors import DataError


class RowError(Exception):
    """A reason a row is unusable; ``str(err)`` is the reason written to the quarantine file."""


@dataclass(frozen=True)
class Layout:
    """A known way of writing training data.

    Attributes:
        name: What ``--format`` calls it.
        shape: The canonical shape it produces; ``None`` only for ``columns``, whose shape follows
            from the mapping (see :func:`resolve_layout`).
        fields: The source columns it reads; ``--map FIELD=COLUMN`` keys refer to these.
        description: One line for help texts and docs.
    """

    name: str
    shape: Shape | None
    fields: tuple[str, ...]
    description: str


# Optional columns every preference layout carries over when present.
_PREFERENCE_EXTRAS = ("margin", "annotator", "source")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_LABELS = {"true": True, "1": True, "false": False, "0": False}
# Fields of the `columns` layout, by the shape they form: (required, optional).
_COLUMN_SHAPES: dict[Shape, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("prompt", "chosen", "rejected"), _PREFERENCE_EXTRAS),
    "feedback": (("prompt", "completion", "label"), ()),
    "text_pair": (("anchor", "positive"), ("negative", "score")),
    "conversation": (("user", "assistant"), ("system",)),
}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "openai_preference",
            "preference",
            ("input", "preferred_output", "non_preferred_output", *_PREFERENCE_EXTRAS),
            'OpenAI preference fine-tuning: {"input": {"messages": [...]}, '
            '"preferred_output": [...], "non_preferred_output": [...]}',
        ),
        Layout(
            "sharegpt_preference",
            "preference",
            ("conversations", "chosen", "rejected", "system", *_PREFERENCE_EXTRAS),
            "ShareGPT conversations ending with a human turn, plus chosen/rejected "
            "{from, value} replies",
        ),
        Layout(
            "sharegpt",
            "conversation",
            ("conversations", "system"),
            'ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}',
        ),
        Layout(
            "hh_rlhf",
            "preference",
            ("chosen", "rejected", *_PREFERENCE_EXTRAS),
            'Anthropic HH-RLHF: chosen/rejected transcripts of "\\n\\nHuman: " and '
            '"\\n\\nAssistant: " turns',
        ),
        Layout(
            "trl_conversational",
            "preference",
            ("prompt", "chosen", "rejected", *_PREFERENCE_EXTRAS),
            "TRL conversational preference: prompt/chosen/rejected message lists "
            "(prompt may be implicit, shared by chosen and rejected)",
        ),
        Layout(
            "trl_standard",
            "preference",
            ("prompt", "chosen", "rejected", *_PREFERENCE_EXTRAS),
            "TRL standard preference: prompt/chosen/rejected strings",
        ),
        Layout(
            "qa_pair",
            "preference",
            ("question", "response_j", "response_k", *_PREFERENCE_EXTRAS),
            "question with a preferred (response_j) and another (response_k) answer; map other "
            "names with --map prompt=COL chosen=COL rejected=COL",
        ),
        Layout(
            "feedback",
            "feedback",
            ("prompt", "completion", "messages", "label"),
            "unpaired feedback (KTO style): prompt/completion or messages, and a true/false label",
        ),
        Layout(
            "openai_chat",
            "conversation",
            ("messages",),
            'OpenAI chat fine-tuning: {"messages": [...]} ending with an assistant turn',
        ),
        Layout(
            "dolly",
            "conversation",
            ("instruction", "context", "response"),
            "Dolly: instruction, optional context, response (category is not used)",
        ),
        Layout(
            "alpaca",
            "conversation",
            ("instruction", "input", "output", "system", "history"),
            "Alpaca: instruction, optional input, output (optional system and history columns)",
        ),
        Layout(
            "sts",
            "text_pair",
            ("sentence1", "sentence2", "score", "columns"),
            "STS Benchmark: headerless TSV (score, sentence1, sentence2 in fields 4-6) or "
            "sentence1/sentence2/score columns; the 0-5 score is kept as is",
        ),
        Layout(
            "text_pair",
            "text_pair",
            ("anchor", "positive", "negative"),
            "text pairs for contrastive training: anchor, positive, optional negative",
        ),
        Layout(
            "columns",
            None,
            tuple(dict.fromkeys(f for req, opt in _COLUMN_SHAPES.values() for f in (*req, *opt))),
            "any columns, mapped to canonical fields with --map (prompt/chosen/rejected, "
            "prompt/completion/label, anchor/positive[/negative|score], user/assistant[/system])",
        ),
    )
}

# Mapping keys a layout accepts besides its own field names, as {alias: field}.
_ALIASES: dict[str, dict[str, str]] = {
    "qa_pair": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
}


def detect_layout(rows: Sequence[dict], mapping: Mapping[str, str] | None = None) -> Layout:
    """Pick the layout of a sample of rows from their keys and value types.

    Layouts are tried from the most specific to the most general, in the order of ``LAYOUTS``
    (e.g. ``sharegpt_preference`` before ``sharegpt``, ``hh_rlhf`` before the TRL layouts); the
    first one that fits more than half of the rows wins, so one odd row does not decide. The
    ``columns`` layout is never detected.

    Args:
        rows: The first parsed rows of a file (a few dozen is plenty).
        mapping: Optional ``FIELD=COLUMN`` renames applied before detection.

    Returns:
        The detected layout.

    Raises:
        DataError: No layout fits the rows.
    """
    if not rows:
        raise DataError(
            "no parsed rows to detect the layout from; fix the unreadable rows or pass --format"
        )
    views = [_renamed(row, mapping or {}) for row in rows]
    for name, fits in _DETECTORS:
        if sum(1 for view in views if fits(view)) * 2 > len(views):
            return LAYOUTS[name]
    keys = ", ".join(str(key) for key in rows[0]) or "(no columns)"
    choices = "|".join(name for name in LAYOUTS)
    raise DataError(
        f"cannot recognise the layout of rows with keys {keys}; pass --format {choices} "
        "or map columns with --map FIELD=COLUMN"
    )


def resolve_layout(layout: Layout, mapping: Mapping[str, str] | None = None) -> Layout:
    """Check ``mapping`` against ``layout`` and return the layout with its shape decided.

    For every layout but ``columns`` this is the layout itself. For ``columns`` the shape
    follows from the mapped fields, and the returned layout's ``fields`` are those fields.

    Raises:
        DataError: The mapping names a field the layout does not have, or (for ``columns``)
            does not form one shape.
    """
    mapping = mapping or {}
    known = set(layout.fields) | set(_ALIASES.get(layout.name, {}))
    unknown = [field for field in mapping if field not in known]
    if unknown:
        raise DataError(
            f"--map {unknown[0]}=...: the {layout.name} layout has no field {unknown[0]!r}; "
            f"its fields are {', '.join(sorted(known))}"
        )
    if layout.name != "columns":
        return layout
    shape = _columns_shape(mapping)
    return Layout("columns", shape, tuple(mapping), f"columns mapped to {shape} fields")


def normalize(
    row: dict, layout: Layout, mapping: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Turn one parsed row into canonical records.

    String prompts become one user message and string responses one assistant message; text
    is kept as written (HH-RLHF turns lose only the whitespace around them). Preference layouts
    carry over ``margin``, ``annotator`` and ``source`` columns when present.

    Args:
        row: A parsed row (``RawRow.data``).
        layout: The layout of the row, from :data:`LAYOUTS` or :func:`detect_layout`.
        mapping: ``FIELD=COLUMN``: read the layout's field ``FIELD`` from the row's ``COLUMN``.

    Returns:
        The canonical records of the row, each with every field of its shape (usually one).

    Raises:
        RowError: The row is unusable (missing column, wrong type, empty content, bad roles).
        DataError: The mapping does not fit the layout.
    """
    resolved = resolve_layout(layout, mapping)
    view = _Row(row, mapping or {}, _ALIASES.get(layout.name, {}))
    if layout.name == "columns":
        record = _columns(view, resolved.shape)
    else:
        record = _NORMALIZERS[layout.name](view)
    return [complete(record, resolved.shape)]


class _Row:
    """A row seen through the user's mapping: fields are looked up by layout field name."""

    def __init__(self, data: dict, mapping: Mapping[str, str], aliases: Mapping[str, str]):
        self.data = data
        self.columns = {aliases.get(field, field): column for field, column in mapping.items()}

    def column(self, field: str) -> str:
        return self.columns.get(field, field)

    def get(self, field: str) -> Any:
        """The value of ``field``, or ``None`` when the column is missing or null."""
        return self.data.get(self.column(field))

    def require(self, field: str) -> Any:
        value = self.get(field)
        if value is None:
            raise RowError(f"missing column {self.column(field)!r}")
        return value


def _renamed(row: dict, mapping: Mapping[str, str]) -> dict:
    view = dict(row)
    for field, column in mapping.items():
        if column in row:
            view[field] = row[column]
    return view


# value checks


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} must be a string, got {_kind(value)}")
    if not value.strip():
        raise RowError(f"empty {what}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    """A text that may be absent; an empty string (a blank CSV cell) counts as absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, what)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError(f"{what} must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except ValueError:
        raise RowError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RowError(f"{what} must be a finite number, got {value!r}")
    return number


def _label(value: Any) -> bool:
    """A feedback label: a boolean, 0/1, or the strings true/false/1/0 (CSV cells)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise RowError(f"label must be true or false (or 1/0), got {value!r}")


def _messages(value: Any, what: str, roles: Mapping[str, str] | None = None) -> list[dict]:
    """Parse a list of messages; ``roles`` renames source roles (ShareGPT ``from`` values)."""
    if not isinstance(value, list) or not value:
        raise RowError(f"{what} must be a non-empty list of messages, got {_kind(value)}")
    parsed = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise RowError(f"{what}[{index}] must be a message object, got {_kind(item)}")
        if roles is not None and "from" in item:
            source_role, content = item.get("from"), item.get("value")
            if source_role not in roles:
                raise RowError(
                    f"unknown role {source_role!r} in {what}[{index}]; expected human, gpt or "
                    "system (or user, assistant)"
                )
            role = roles[source_role]
        else:
            role, content = item.get("role"), item.get("content")
            # OpenAI renamed the system role to developer in newer exports.
            role = "system" if role == "developer" else role
            if role not in ROLES:
                raise RowError(
                    f"{what}[{index}] has role {role!r}; expected one of {', '.join(ROLES)}"
                )
        if not isinstance(content, str):
            raise RowError(f"{what}[{index}] content must be a string, got {_kind(content)}")
        if not content.strip():
            if role == "system":
                # An empty system message says nothing; dropping it beats losing the row.
                continue
            raise RowError(f"{what}[{index}] ({role}) has empty content")
        parsed.append(message(role, content))
    return parsed


def _check_opening(turns: list[dict], what: str) -> None:
    """A system message may only come first, and the first other turn is the user's."""
    for index, turn in enumerate(turns):
        if turn["role"] == "system" and index > 0:
            raise RowError(f"{what} has a system message at turn {index}; only the first may be")
    first = next((t["role"] for t in turns if t["role"] != "system"), None)
    if first != "user":
        raise RowError(f"{what} must start with a user turn (after an optional system message)")


def _prompt(value: Any, what: str = "prompt", roles: Mapping[str, str] | None = None) -> list:
    if isinstance(value, str):
        return [message("user", _text(value, what))]
    turns = _messages(value, what, roles)
    _check_opening(turns, what)
    if turns[-1]["role"] != "user":
        raise RowError(f"{what} must end with a user turn, got {turns[-1]['role']}")
    return turns


def _response(value: Any, what: str, roles: Mapping[str, str] | None = None) -> list:
    """Assistant messages answering a prompt; ``what`` names them in reasons (``chosen``)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty {what} response")
        return [message("assistant", value)]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and (not value or _all_blank(value)):
        raise RowError(f"empty {what} response")
    turns = _messages(value, what, roles)
    if any(turn["role"] != "assistant" for turn in turns):
        raise RowError(f"{what} must hold only assistant messages")
    return turns


def _all_blank(items: list) -> bool:
    def content(item: Any) -> Any:
        return item.get("content", item.get("value")) if isinstance(item, dict) else item

    return all(isinstance(content(item), str) and not content(item).strip() for item in items)


def _conversation(turns: list[dict], what: str) -> dict:
    _check_opening(turns, what)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"{what} must end with an assistant turn to be trainable")
    return {"messages": turns}


def _preference(view: _Row, prompt: list, chosen: list, rejected: list) -> dict:
    margin = view.get("margin")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": None if margin is None else _number(margin, "margin"),
        "annotator": _optional_text(view.get("annotator"), "annotator"),
        "source": _optional_text(view.get("source"), "source"),
    }


# one normalizer per layout


def _hh_turns(transcript: Any, what: str) -> list[dict]:
    if not isinstance(transcript, str):
        raise RowError(f"{what} must be a transcript string, got {_kind(transcript)}")
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"{what} transcript must start with '\\n\\nHuman:'")
    # The turn markers carry the layout, so the whitespace around each turn is formatting.
    return [
        message(_HH_ROLES[role], text.strip())
        for role, text in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _hh_rlhf(view: _Row) -> dict:
    sides = {}
    for side in ("chosen", "rejected"):
        turns = _hh_turns(view.require(side), side)
        if turns[-1]["role"] != "assistant":
            raise RowError(f"{side} transcript must end with an assistant turn")
        sides[side] = (turns[:-1], turns[-1])
    if sides["chosen"][0] != sides["rejected"][0]:
        raise RowError("chosen and rejected have different prompts")
    prompt = sides["chosen"][0]
    for index, turn in enumerate(prompt):
        if not turn["content"]:
            raise RowError(f"prompt[{index}] ({turn['role']}) has empty content")
    _check_opening(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise RowError("prompt must end with a user turn, got assistant")
    chosen = _response(sides["chosen"][1]["content"], "chosen")
    rejected = _response(sides["rejected"][1]["content"], "rejected")
    return _preference(view, prompt, chosen, rejected)


def _trl(view: _Row) -> dict:
    chosen, rejected = view.require("chosen"), view.require("rejected")
    prompt = view.get("prompt")
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    elif prompt is None:
        raise RowError(f"missing column {view.column('prompt')!r}")
    return _preference(
        view, _prompt(prompt), _response(chosen, "chosen"), _response(rejected, "rejected")
    )


def _split_implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split two full conversations into their shared prompt and the two replies."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The prompt ends at the last shared user turn; what follows must be the replies.
    while shared > 0 and not (
        isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "user"
    ):
        shared -= 1
    if shared == 0:
        raise RowError("chosen and rejected share no prompt ending with a user turn")
    if shared == len(chosen) and shared == len(rejected):
        raise RowError("chosen and rejected are the same conversation; no replies to compare")
    for side in (chosen[shared:], rejected[shared:]):
        if any(isinstance(m, dict) and m.get("role") != "assistant" for m in side):
            raise RowError("chosen and rejected have different prompts")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _openai_preference(view: _Row) -> dict:
    source = view.require("input")
    if not isinstance(source, dict) or "messages" not in source:
        raise RowError(f"{view.column('input')} must be an object with messages")
    return _preference(
        view,
        _prompt(source["messages"], "input.messages"),
        _response(view.require("preferred_output"), "chosen"),
        _response(view.require("non_preferred_output"), "rejected"),
    )


def _sharegpt_turns(view: _Row) -> list[dict]:
    turns = _messages(view.require("conversations"), "conversations", _SHAREGPT_ROLES)
    system = _optional_text(view.get("system"), "system")
    if system is not None and turns and turns[0]["role"] != "system":
        turns.insert(0, message("system", system))
    return turns


def _sharegpt(view: _Row) -> dict:
    return _conversation(_sharegpt_turns(view), "conversations")


def _sharegpt_preference(view: _Row) -> dict:
    prompt = _sharegpt_turns(view)
    _check_opening(prompt, "conversations")
    if prompt[-1]["role"] != "user":
        raise RowError("conversations must end with a human turn (the prompt of the pair)")
    return _preference(
        view,
        prompt,
        _response(view.require("chosen"), "chosen", _SHAREGPT_ROLES),
        _response(view.require("rejected"), "rejected", _SHAREGPT_ROLES),
    )


def _openai_chat(view: _Row) -> dict:
    return _conversation(_messages(view.require("messages"), "messages"), "messages")


def _instruction_turns(view: _Row, extra: str, answer: str) -> list[dict]:
    """Turns of an instruction row: the user turn is the instruction, then ``extra`` if any."""
    instruction = _text(view.require("instruction"), "instruction")
    extra_text = _optional_text(view.get(extra), extra)
    user = instruction if extra_text is None else f"{instruction}\n\n{extra_text}"
    return [message("user", user), message("assistant", _text(view.require(answer), answer))]


def _alpaca(view: _Row) -> dict:
    turns = []
    system = _optional_text(view.get("system"), "system")
    if system is not None:
        turns.append(message("system", system))
    history = view.get("history") or []
    if not isinstance(history, list):
        raise RowError(
            f"history must be a list of [instruction, response] pairs, got {_kind(history)}"
        )
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"history[{index}] must be an [instruction, response] pair")
        turns.append(message("user", _text(pair[0], f"history[{index}] instruction")))
        turns.append(message("assistant", _text(pair[1], f"history[{index}] response")))
    turns.extend(_instruction_turns(view, "input", "output"))
    return {"messages": turns}


def _dolly(view: _Row) -> dict:
    return {"messages": _instruction_turns(view, "context", "response")}


def _feedback(view: _Row) -> dict:
    label = _label(view.require("label"))
    if view.get("messages") is not None and view.get("completion") is None:
        turns = _messages(view.get("messages"), "messages")
        if turns[-1]["role"] != "assistant":
            raise RowError("messages must end with the assistant turn that the label judges")
        prompt = turns[:-1]
        if not prompt:
            raise RowError("messages hold no prompt before the judged assistant turn")
        return {
            "prompt": _prompt(prompt, "messages"),
            "completion": turns[-1:],
            "label": label,
        }
    return {
        "prompt": _prompt(view.require("prompt")),
        "completion": _response(view.require("completion"), "completion"),
        "label": label,
    }


def _qa_pair(view: _Row) -> dict:
    return _preference(
        view,
        _prompt(view.require("question"), "question"),
        _response(view.require("response_j"), "chosen"),
        _response(view.require("response_k"), "rejected"),
    )


def _sts(view: _Row) -> dict:
    columns = view.get("columns")
    if isinstance(columns, list) and view.get("sentence1") is None:
        if len(columns) < 7:
            raise RowError(
                f"STS row has {len(columns)} fields; expected at least 7 "
                "(genre, file, year, id, score, sentence1, sentence2)"
            )
        score, first, second = columns[4], columns[5], columns[6]
    else:
        first = view.get("sentence1")
        second = view.get("sentence2")
        if first is None and second is None:
            first, second = view.get("anchor"), view.get("positive")
        if first is None or second is None:
            raise RowError(
                f"missing column {view.column('sentence1' if first is None else 'sentence2')!r}"
            )
        score = view.require("score")
    # The 0-5 STS scale is kept; the contrastive stage decides how to scale it.
    return {
        "anchor": _text(first, "sentence1"),
        "positive": _text(second, "sentence2"),
        "score": _number(score, "score"),
    }


def _text_pair(view: _Row) -> dict:
    return {
        "anchor": _text(view.require("anchor"), "anchor"),
        "positive": _text(view.require("positive"), "positive"),
        "negative": _optional_text(view.get("negative"), "negative"),
    }


def _columns_shape(mapping: Mapping[str, str]) -> Shape:
    mapped = set(mapping)
    for shape, (required, optional) in _COLUMN_SHAPES.items():
        if set(required) <= mapped:
            extra = sorted(mapped - set(required) - set(optional))
            if extra:
                raise DataError(
                    f"--map {', '.join(extra)} do not belong to {shape} records; "
                    f"{shape} takes {', '.join(required + optional)}"
                )
            return shape
    raise DataError(
        f"the columns layout needs a mapping that forms a shape, got {sorted(mapped) or 'none'}; "
        "map prompt,chosen,rejected (preference), prompt,completion,label (feedback), "
        "anchor,positive[,negative|score] (text_pair) or user,assistant[,system] (conversation)"
    )


def _columns(view: _Row, shape: Shape | None) -> dict:
    if shape == "preference":
        return _preference(
            view,
            _prompt(view.require("prompt")),
            _response(view.require("chosen"), "chosen"),
            _response(view.require("rejected"), "rejected"),
        )
    if shape == "feedback":
        return {
            "prompt": _prompt(view.require("prompt")),
            "completion": _response(view.require("completion"), "completion"),
            "label": _label(view.require("label")),
        }
    if shape == "text_pair":
        score = view.get("score")
        return {
            "anchor": _text(view.require("anchor"), "anchor"),
            "positive": _text(view.require("positive"), "positive"),
            "negative": _optional_text(view.get("negative"), "negative"),
            "score": None if score is None else _number(score, "score"),
        }
    turns = []
    system = _optional_text(view.get("system"), "system")
    if system is not None:
        turns.append(message("system", system))
    turns.append(message("user", _text(view.require("user"), "user")))
    turns.append(message("assistant", _text(view.require("assistant"), "assistant")))
    return {"messages": turns}


_NORMALIZERS: dict[str, Callable[[_Row], dict]] = {
    "openai_preference": _openai_preference,
    "sharegpt_preference": _sharegpt_preference,
    "sharegpt": _sharegpt,
    "hh_rlhf": _hh_rlhf,
    "trl_conversational": _trl,
    "trl_standard": _trl,
    "qa_pair": _qa_pair,
    "feedback": _feedback,
    "openai_chat": _openai_chat,
    "dolly": _dolly,
    "alpaca": _alpaca,
    "sts": _sts,
    "text_pair": _text_pair,
}


# detection: what a row of each layout looks like, tried in the order of LAYOUTS


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _looks_numeric(value: Any) -> bool:
    try:
        _number(value, "score")
    except RowError:
        return False
    return True


_DETECTORS: list[tuple[str, Callable[[dict], bool]]] = [
    (
        "openai_preference",
        lambda r: (
            isinstance(r.get("input"), dict)
            and "messages" in r["input"]
            and "preferred_output" in r
            and "non_preferred_output" in r
        ),
    ),
    (
        "sharegpt_preference",
        lambda r: isinstance(r.get("conversations"), list) and "chosen" in r and "rejected" in r,
    ),
    ("sharegpt", lambda r: isinstance(r.get("conversations"), list)),
    (
        "hh_rlhf",
        lambda r: (
            "prompt" not in r
            and isinstance(r.get("chosen"), str)
            and isinstance(r.get("rejected"), str)
            and r["chosen"].startswith("\n\nHuman:")
        ),
    ),
    (
        "trl_conversational",
        lambda r: (
            _is_message_list(r.get("chosen"))
            and _is_message_list(r.get("rejected"))
            and (r.get("prompt") is None or _is_message_list(r.get("prompt")))
        ),
    ),
    (
        "trl_standard",
        lambda r: all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")),
    ),
    ("qa_pair", lambda r: all(k in r for k in ("question", "response_j", "response_k"))),
    (
        "feedback",
        lambda r: (
            "label" in r
            and (_is_message_list(r.get("messages")) or ("prompt" in r and "completion" in r))
        ),
    ),
    ("openai_chat", lambda r: _is_message_list(r.get("messages"))),
    ("dolly", lambda r: "instruction" in r and "response" in r),
    ("alpaca", lambda r: "instruction" in r and "output" in r),
    (
        "sts",
        lambda r: (
            (
                isinstance(r.get("columns"), list)
                and len(r["columns"]) >= 7
                and _looks_numeric(r["columns"][4])
            )
            or all(k in r for k in ("sentence1", "sentence2", "score"))
            or all(k in r for k in ("anchor", "positive", "score"))
        ),
    ),
    ("text_pair", lambda r: "anchor" in r and "positive" in r),
]
