"""Reduce annotation exports with several judgements per item to canonical preference pairs.

Three export layouts are understood, one row per judgement: pairwise ``votes``, k-wise
``rankings`` and 1-to-N ``scores``. Each item is reduced by majority (or by mean score), every
row ends up either behind a pair or in a dropped list with its line and reason, and the
inter-annotator agreement is reported with the counts.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignpipe.data.records import ROLES, complete, message
from alignpipe.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ANNOTATION_LAYOUTS = ("votes", "rankings", "scores")

# Keys that identify a layout (detection) and keys a judgement row must carry (validation).
# ``annotator`` is optional everywhere: without it, agreement is still computed per item, but
# duplicate judgements by one person cannot be recognised.
_SIGNATURES = {
    "votes": ("item_id", "response_a", "response_b", "choice"),
    "rankings": ("item_id", "responses", "ranking"),
    "scores": ("item_id", "responses", "scores"),
}
_REQUIRED = {
    "votes": ("item_id", "prompt", "response_a", "response_b", "choice"),
    "rankings": ("item_id", "prompt", "responses", "ranking"),
    "scores": ("item_id", "prompt", "responses", "scores"),
}
_CHOICES = ("a", "b", "tie")
_FLIPPED = {"a": "b", "b": "a", "tie": "tie"}
# Rows inspected by detection: enough to outvote a few odd rows, cheap on big exports.
_DETECT_ROWS = 50


@dataclass
class Candidate:
    """One preference pair reduced from the judgements of one item.

    Attributes:
        record: canonical preference record (``prompt``, ``chosen``, ``rejected``, ``margin``,
            ``annotator``, ``source``); ``annotator`` is ``"majority"`` when several judgements
            were combined, else the single annotator's id (``None`` when the export has none).
        lines: source lines of every judgement of the item. A ranked or scored item yields
            several pairs from the same rows, so the same lines can appear in several candidates.
    """

    record: dict[str, Any]
    lines: list[int]


@dataclass
class Dropped:
    """Judgement rows that produced no pair, with the reason.

    A malformed row is dropped on its own; an item whose pairs are all tied (or whose scores are
    all closer than ``min_score_gap``) is one entry holding all of its lines.
    """

    lines: list[int]
    reason: str
    item_id: str | None


@dataclass
class Aggregation:
    """The result of :func:`aggregate`: pairs, dropped rows and statistics.

    ``stats`` holds ``judgements`` (rows read), ``malformed`` (rows dropped on their own),
    ``items`` (items with at least one valid judgement), ``pairs`` (candidates), ``ties`` (pairs
    dropped for lack of a majority or score gap, including those of partly tied items whose
    other pairs were kept), ``tied_items``, ``underjudged_items`` (fewer than ``min_judgements``),
    ``annotators`` (distinct named annotators) and ``agreement`` (see :func:`aggregate`).
    """

    candidates: list[Candidate] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The canonical preference records of all candidates, in order."""
        return [c.record for c in self.candidates]


@dataclass
class _Judgement:
    line: int
    item_id: str
    annotator: str | None
    prompt: list[dict[str, str]]
    responses: list[list[dict[str, str]]]
    value: Any  # the choice (str), the ranking (list[int]) or the scores (list[float])


class _Malformed(Exception):
    """A judgement row that cannot be used; the message is the quarantine reason."""


def detect_annotation_layout(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Tell which annotation export layout the rows follow, from their keys.

    Args:
        rows: parsed rows (dicts); only the first few dozen are inspected.

    Returns:
        One of :data:`ANNOTATION_LAYOUTS`, or ``None`` when at most half of the inspected rows
        carry the keys of any layout (the rows are not an annotation export).

    Raises:
        DataError: two layouts match equally well (rows carry both ``ranking`` and ``scores``).
    """
    sample = [row for row in itertools.islice(rows, _DETECT_ROWS) if isinstance(row, Mapping)]
    if not sample:
        return None
    hits = {
        layout: sum(all(key in row for key in keys) for row in sample)
        for layout, keys in _SIGNATURES.items()
    }
    best = max(hits.values())
    if best * 2 <= len(sample):
        return None
    winners = [layout for layout, count in hits.items() if count == best]
    if len(winners) > 1:
        raise DataError(
            f"rows match the annotation layouts {' and '.join(winners)} equally; "
            "remove the extra keys or pass the layout explicitly"
        )
    return winners[0]


def aggregate(
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    layout: str,
    *,
    min_score_gap: float = 1.0,
    min_judgements: int = 1,
    source: str | None = None,
) -> Aggregation:
    """Reduce judgement rows of one export layout to preference pairs.

    Rows are grouped by ``item_id``; the first valid row of an item fixes its prompt and
    responses, and a later row that disagrees is dropped (for ``votes``, a row showing the two
    responses swapped is accepted with its choice mirrored, since position randomisation is
    common). A second judgement by the same annotator on the same item is dropped too.

    - ``votes``: the side with more votes wins; equal ``a`` and ``b`` counts (including all
      ``tie``) drop the item. Margin: (winner votes - loser votes) / all votes of the item, so a
      ``tie`` vote lowers the margin.
    - ``rankings``: every response pair (i, j) is won by the side more annotators rank higher;
      margin as for votes. Equal counts drop that pair.
    - ``scores``: a pair (higher, lower) for every response pair whose mean scores differ by at
      least ``min_score_gap``; margin is the difference of the means.

    ``stats["agreement"]`` covers all valid judgements of items judged at least twice: Fleiss'
    kappa over the categories a/b/tie plus the mean raw agreement (share of annotator pairs who
    agree) for votes; the mean Kendall tau over pairs of rankings of the same item for
    rankings; Krippendorff's alpha (interval metric) over (item, response) units for scores.
    A statistic is ``None`` when the data cannot define it.

    Args:
        rows: ``(line, row)`` tuples, lines 1-based in the source file.
        layout: one of :data:`ANNOTATION_LAYOUTS`.
        min_score_gap: smallest mean-score difference that makes a pair (``scores`` only).
        min_judgements: items with fewer valid judgements are dropped.
        source: written to each record's ``source`` field.

    Returns:
        The candidates, the dropped rows and the statistics.

    Raises:
        ConfigError: unknown layout, negative ``min_score_gap`` or ``min_judgements`` below 1.
    """
    if layout not in ANNOTATION_LAYOUTS:
        raise ConfigError(
            f"unknown annotation layout {layout!r}; use one of {', '.join(ANNOTATION_LAYOUTS)}"
        )
    if min_score_gap < 0:
        raise ConfigError(f"min_score_gap must be >= 0, got {min_score_gap}; use e.g. 1.0")
    if min_judgements < 1:
        raise ConfigError(f"min_judgements must be >= 1, got {min_judgements}; use 1 to keep all")

    result = Aggregation()
    items, malformed, judgements = _group(rows, layout, result.dropped)

    # reduce each item to pairs
    ties = tied_items = underjudged = 0
    for item_id, group in items.items():
        lines = sorted(j.line for j in group)
        if len(group) < min_judgements:
            underjudged += 1
            reason = f"{len(group)} judgement(s), fewer than min_judgements={min_judgements}"
            result.dropped.append(Dropped(lines, reason, item_id))
            continue
        pairs, item_ties, tie_reason = _REDUCERS[layout](group, min_score_gap)
        ties += item_ties
        if not pairs:
            tied_items += 1
            result.dropped.append(Dropped(lines, tie_reason, item_id))
            continue
        annotator = "majority" if len(group) > 1 else group[0].annotator
        for chosen, rejected, margin in pairs:
            # copies, so that records of one item share no lists a consumer could mutate
            record = {
                "prompt": [dict(m) for m in group[0].prompt],
                "chosen": [dict(m) for m in chosen],
                "rejected": [dict(m) for m in rejected],
                "margin": margin,
                "annotator": annotator,
                "source": source,
            }
            result.candidates.append(Candidate(complete(record, "preference"), list(lines)))

    annotators = {j.annotator for g in items.values() for j in g if j.annotator is not None}
    result.stats = {
        "judgements": judgements,
        "malformed": malformed,
        "items": len(items),
        "pairs": len(result.candidates),
        "ties": ties,
        "tied_items": tied_items,
        "underjudged_items": underjudged,
        "annotators": len(annotators),
        "agreement": _AGREEMENT[layout]([g for g in items.values() if len(g) >= 2]),
    }
    logger.info(
        "annotations (%s): %d judgements on %d items -> %d pairs; dropped %d malformed rows, "
        "%d tied and %d underjudged items",
        layout,
        judgements,
        len(items),
        len(result.candidates),
        malformed,
        tied_items,
        underjudged,
    )
    return result


# -- agreement statistics ---------------------------------------------------------------------


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from per-item category counts, allowing a different rater count per item.

    Args:
        table: one row per item, one count per category; items with fewer than two ratings are
            ignored.

    Returns:
        ``(P - Pe) / (1 - Pe)`` with ``P`` the mean per-item agreement and ``Pe`` the chance
        agreement from the pooled category shares; ``None`` when no item has two ratings or
        every rating falls in one category (``Pe = 1``).
    """
    rows = [row for row in table if sum(row) >= 2]
    if not rows:
        return None
    observed = raw_agreement(rows)
    total = sum(sum(row) for row in rows)
    shares = [sum(row[k] for row in rows) / total for k in range(len(rows[0]))]
    expected = sum(p * p for p in shares)
    if observed is None or math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1.0 - expected)


def raw_agreement(table: Sequence[Sequence[int]]) -> float | None:
    """Mean share of rater pairs that agree on an item, over items with two or more ratings."""
    shares = []
    for row in table:
        n = sum(row)
        if n >= 2:
            shares.append(sum(c * (c - 1) for c in row) / (n * (n - 1)))
    return sum(shares) / len(shares) if shares else None


def kendall_tau(first: Sequence[int], second: Sequence[int]) -> float:
    """Kendall's tau between two rankings (lists of item indices, best first) of the same items.

    Rankings are permutations, so there are no ties: tau = (concordant - discordant) / pairs.
    """
    if sorted(first) != sorted(second) or len(first) < 2:
        raise ValueError("kendall_tau needs two permutations of the same two or more items")
    pos_a = {item: rank for rank, item in enumerate(first)}
    pos_b = {item: rank for rank, item in enumerate(second)}
    score = 0
    for i, j in itertools.combinations(pos_a, 2):
        score += 1 if (pos_a[i] - pos_a[j]) * (pos_b[i] - pos_b[j]) > 0 else -1
    return score / (len(first) * (len(first) - 1) / 2)


def krippendorff_alpha_interval(units: Sequence[Sequence[float]]) -> float | None:
    """Krippendorff's alpha with the interval (squared difference) metric.

    Args:
        units: the values given to each unit by its raters; units with fewer than two values
            cannot be paired and are ignored.

    Returns:
        ``1 - Do / De``: ``Do`` is the mean squared difference between values of the same unit
        (each unit weighted by ``1 / (m_u - 1)``), ``De`` the mean squared difference between
        any two pairable values. ``None`` when fewer than two units are pairable or all pairable
        values are equal.
    """
    pairable = [list(u) for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    if len(pairable) < 2:
        return None
    # sums over ordered pairs (i != j), hence the factor 2 on the unordered ones
    within = sum(
        2 * sum((a - b) ** 2 for a, b in itertools.combinations(u, 2)) / (len(u) - 1)
        for u in pairable
    )
    mean = sum(values) / n
    between = 2 * n * sum((v - mean) ** 2 for v in values)
    if between <= 1e-12 * n * n:
        return None
    observed = within / n
    expected = between / (n * (n - 1))
    return 1.0 - observed / expected


# -- parsing and grouping ---------------------------------------------------------------------


def _group(
    rows: Iterable[tuple[int, Mapping[str, Any]]], layout: str, dropped: list[Dropped]
) -> tuple[dict[str, list[_Judgement]], int, int]:
    """Parse rows into judgements grouped by item; drop malformed and inconsistent rows."""
    items: dict[str, list[_Judgement]] = {}
    seen: dict[tuple[str, str], int] = {}  # (item, annotator) -> line of the first judgement
    malformed = judgements = 0
    for line, row in rows:
        judgements += 1
        item_id = _item_id(row)
        try:
            judgement = _parse(line, row, layout)
            first = items.get(judgement.item_id)
            if first:
                _reconcile(judgement, first[0], layout)
            key = (judgement.item_id, judgement.annotator or "")
            if judgement.annotator is not None and key in seen:
                raise _Malformed(
                    f"annotator {judgement.annotator!r} already judged item "
                    f"{judgement.item_id!r} at line {seen[key]}"
                )
        except _Malformed as err:
            malformed += 1
            dropped.append(Dropped([line], str(err), item_id))
            continue
        seen[key] = line
        items.setdefault(judgement.item_id, []).append(judgement)
    return items, malformed, judgements


def _item_id(row: Any) -> str | None:
    if not isinstance(row, Mapping):
        return None
    value = row.get("item_id")
    if value is None or isinstance(value, (bool, dict, list)) or str(value).strip() == "":
        return None
    return str(value).strip()


def _parse(line: int, row: Any, layout: str) -> _Judgement:
    if not isinstance(row, Mapping):
        raise _Malformed(f"row is a {type(row).__name__}, not an object")
    missing = [key for key in _REQUIRED[layout] if row.get(key) is None]
    if missing:
        raise _Malformed(f"missing key {missing[0]!r}")
    item_id = _item_id(row)
    if item_id is None:
        raise _Malformed(f"item_id {row['item_id']!r} is not a usable id")
    annotator = row.get("annotator")
    if annotator is not None:
        if isinstance(annotator, (dict, list)) or str(annotator).strip() == "":
            raise _Malformed(f"annotator {annotator!r} is not a usable id")
        annotator = str(annotator).strip()
    prompt = _prompt(row["prompt"])

    if layout == "votes":
        responses = [_response(row["response_a"], "response_a")]
        responses.append(_response(row["response_b"], "response_b"))
        choice = row["choice"]
        value = choice.strip().lower() if isinstance(choice, str) else choice
        if value not in _CHOICES:
            raise _Malformed(f"choice {choice!r} is not one of {', '.join(_CHOICES)}")
    else:
        raw = row["responses"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise _Malformed("responses must be a list of at least two responses")
        responses = [_response(r, f"responses[{k}]") for k, r in enumerate(raw)]
        value = _ranking(row["ranking"], len(raw)) if layout == "rankings" else None
        if layout == "scores":
            value = _scores(row["scores"], len(raw))
    for (i, a), (j, b) in itertools.combinations(enumerate(responses), 2):
        if a == b:
            which = "response_a and response_b" if layout == "votes" else f"responses {i} and {j}"
            raise _Malformed(f"{which} are identical")
    return _Judgement(line, item_id, annotator, prompt, responses, value)


def _prompt(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _Malformed("prompt is empty")
        return [message("user", value)]
    messages = _messages(value, "prompt", ROLES)
    if messages[-1]["role"] != "user":
        raise _Malformed("prompt must end with a user message")
    return messages


def _response(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise _Malformed(f"{name} is empty")
        return [message("assistant", value)]
    return _messages(value, name, ("assistant",))


def _messages(value: Any, name: str, roles: Sequence[str]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Malformed(f"{name} must be text or a non-empty list of messages")
    messages = []
    for msg in value:
        if not isinstance(msg, Mapping) or not isinstance(msg.get("content"), str):
            raise _Malformed(f"{name} holds an entry that is not a message with text content")
        if msg.get("role") not in roles:
            raise _Malformed(f"{name} has a message with role {msg.get('role')!r}")
        messages.append(message(msg["role"], msg["content"]))
    return messages


def _ranking(value: Any, size: int) -> list[int]:
    valid = isinstance(value, list) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in value
    )
    if not valid or sorted(value) != list(range(size)):
        raise _Malformed(f"ranking {value!r} is not a permutation of 0..{size - 1}")
    return list(value)


def _scores(value: Any, size: int) -> list[float]:
    if not isinstance(value, list) or len(value) != size:
        count = len(value) if isinstance(value, list) else "no list of"
        raise _Malformed(f"scores has {count} values for {size} responses")
    for score in value:
        number = isinstance(score, (int, float)) and not isinstance(score, bool)
        if not number or not math.isfinite(score):
            raise _Malformed(f"score {score!r} is not a finite number")
    return [float(s) for s in value]


def _reconcile(judgement: _Judgement, first: _Judgement, layout: str) -> None:
    """Check a judgement against the item's first one; mirror swapped votes in place."""
    where = f"the first judgement of item {first.item_id!r} (line {first.line})"
    if judgement.prompt != first.prompt:
        raise _Malformed(f"prompt differs from {where}")
    if judgement.responses == first.responses:
        return
    if layout == "votes" and judgement.responses == first.responses[::-1]:
        judgement.responses = first.responses
        judgement.value = _FLIPPED[judgement.value]
        return
    raise _Malformed(f"responses differ from {where}")


# -- reduction per layout ---------------------------------------------------------------------

_Pair = tuple[list[dict[str, str]], list[dict[str, str]], float]


def _reduce_votes(group: list[_Judgement], _gap: float) -> tuple[list[_Pair], int, str]:
    counts = Counter(j.value for j in group)
    a, b, tie = counts["a"], counts["b"], counts["tie"]
    if a == b:
        return [], 1, f"tie: {a} a, {b} b, {tie} tie"
    responses = group[0].responses
    chosen, rejected = (responses[0], responses[1]) if a > b else (responses[1], responses[0])
    return [(chosen, rejected, abs(a - b) / len(group))], 0, ""


def _reduce_rankings(group: list[_Judgement], _gap: float) -> tuple[list[_Pair], int, str]:
    responses = group[0].responses
    positions = [{item: rank for rank, item in enumerate(j.value)} for j in group]
    pairs, ties = [], 0
    for i, j in itertools.combinations(range(len(responses)), 2):
        i_wins = sum(pos[i] < pos[j] for pos in positions)
        j_wins = len(group) - i_wins
        if i_wins == j_wins:
            ties += 1
            continue
        win, lose = (i, j) if i_wins > j_wins else (j, i)
        pairs.append((responses[win], responses[lose], abs(i_wins - j_wins) / len(group)))
    return pairs, ties, f"tie: every response pair split {len(group) // 2}-{len(group) // 2}"


def _reduce_scores(group: list[_Judgement], gap: float) -> tuple[list[_Pair], int, str]:
    responses = group[0].responses
    means = [sum(j.value[k] for j in group) / len(group) for k in range(len(responses))]
    pairs, ties = [], 0
    for i, j in itertools.combinations(range(len(responses)), 2):
        diff = means[i] - means[j]
        # a gap equal to min_score_gap counts, despite float noise in the means
        if diff == 0 or abs(diff) < gap - 1e-9:
            ties += 1
            continue
        win, lose = (i, j) if diff > 0 else (j, i)
        pairs.append((responses[win], responses[lose], abs(diff)))
    return pairs, ties, f"no pair of mean scores differs by min_score_gap={gap}"


_REDUCERS = {"votes": _reduce_votes, "rankings": _reduce_rankings, "scores": _reduce_scores}


def _votes_agreement(groups: list[list[_Judgement]]) -> dict[str, Any]:
    table = [[Counter(j.value for j in g)[c] for c in _CHOICES] for g in groups]
    return {
        "fleiss_kappa": fleiss_kappa(table),
        "raw_agreement": raw_agreement(table),
        "items": len(groups),
    }


def _rankings_agreement(groups: list[list[_Judgement]]) -> dict[str, Any]:
    taus = [kendall_tau(x.value, y.value) for g in groups for x, y in itertools.combinations(g, 2)]
    return {"kendall_tau": sum(taus) / len(taus) if taus else None, "items": len(groups)}


def _scores_agreement(groups: list[list[_Judgement]]) -> dict[str, Any]:
    units = [[j.value[k] for j in g] for g in groups for k in range(len(g[0].responses))]
    return {"krippendorff_alpha_interval": krippendorff_alpha_interval(units), "items": len(groups)}


_AGREEMENT = {
    "votes": _votes_agreement,
    "rankings": _rankings_agreement,
    "scores": _scores_agreement,
}
