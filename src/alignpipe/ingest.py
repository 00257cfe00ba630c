"""Preference ingest stage: human or simulated judgements to canonical preference pairs.

Takes ready-made pairs (HH-RLHF, TRL, OpenAI preference, ShareGPT, question/answer columns),
unpaired thumbs-up/down feedback, and annotation exports with several judgements per item
(pairwise votes, k-wise rankings, 1-to-N scores), which are reduced to pairs with the
inter-annotator agreement reported.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignpipe.config import flatten, option
from alignpipe.data import annotations
from alignpipe.data.build import (
    DataOptions,
    DataResult,
    build,
    collect,
    load_tokenizer,
    log_result,
    write,
)
from alignpipe.data.readers import read_rows
from alignpipe.data.validate import Candidate, Quarantined
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


@dataclass
class IngestConfig(DataOptions):
    """Preference ingest: pairs, feedback or annotation exports to canonical preference data."""

    min_score_gap: float = option(
        1.0, help="Scores exports: smallest gap in mean score that makes a pair."
    )
    min_judgements: int = option(
        1, help="Annotation exports: drop items judged by fewer annotators than this."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_score_gap <= 0:
            raise ConfigError(f"min_score_gap must be positive, got {self.min_score_gap}")
        if self.min_judgements < 1:
            raise ConfigError(f"min_judgements must be at least 1, got {self.min_judgements}")


def run(
    config: IngestConfig,
    inputs: Sequence[str],
    output: str,
    tracker: Tracker | None = None,
) -> DataResult:
    """Read, reduce judgements to pairs, validate, split and write; returns the result."""
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))

    # read: annotation exports are aggregated, everything else normalized row by row
    layout, shape, candidates, unparsed, extra = _read(inputs, config)
    eval_candidates = None
    if config.eval_inputs:
        _, eval_shape, eval_candidates, eval_unparsed, _ = _read(config.eval_inputs, config)
        if eval_shape != shape:
            raise DataError(f"eval_inputs hold {eval_shape} records but inputs hold {shape}")
        unparsed += eval_unparsed

    # validate, split, count
    tokenizer = load_tokenizer(config.tokenizer)
    result = build(
        shape,
        candidates,
        eval_candidates,
        unparsed,
        config,
        tokenizer=tokenizer,
        layout=layout,
        extra_stats=extra,
    )

    # write and log
    files = write(result, output)
    log_result(tracker, result, files)
    log.info(
        "ingest: read %d, kept %d, quarantined %d (format %s)",
        result.stats["read"],
        result.stats["kept"],
        result.stats["quarantined"],
        layout,
    )
    return result


def _read(
    inputs: Sequence[str], config: IngestConfig
) -> tuple[str, str, list[Candidate], list[Quarantined], dict[str, Any]]:
    export = config.format if config.format in annotations.ANNOTATION_LAYOUTS else None
    if config.format is None:
        head = list(itertools.islice(read_rows(inputs[0], config.file_format), 20))
        export = annotations.detect_annotation_layout([r.data for r in head if r.data])
    if export is None:
        layout, shape, candidates, unparsed = collect(inputs, config, ("preference", "feedback"))
        return layout, shape, candidates, unparsed, {}
    candidates, unparsed, stats = _aggregate(inputs, export, config)
    return export, "preference", candidates, unparsed, stats


def _aggregate(
    inputs: Sequence[str], export: str, config: IngestConfig
) -> tuple[list[Candidate], list[Quarantined], dict[str, Any]]:
    """Reduce each input's judgements to candidate pairs; rows that make none are quarantined."""
    candidates: list[Candidate] = []
    unparsed: list[Quarantined] = []
    stats: dict[str, Any] = {}
    for uri in inputs:
        rows = []
        for row in read_rows(uri, config.file_format):
            if row.error is not None:
                unparsed.append(Quarantined(row.source, [row.line], "unreadable", row.error))
            else:
                rows.append((row.line, row.data))
        agg = annotations.aggregate(
            rows,
            export,
            min_score_gap=config.min_score_gap,
            min_judgements=config.min_judgements,
            source=uri,
        )
        candidates += [Candidate(c.record, uri, c.lines) for c in agg.candidates]
        unparsed += [Quarantined(uri, d.lines, "unresolved", d.reason) for d in agg.dropped]
        stats = _merge(stats, agg.stats)
    return candidates, unparsed, stats


def _merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add counts of several exports; agreement is reported per export when there are several."""
    if not total:
        return dict(part)
    merged = dict(total)
    for key, value in part.items():
        if isinstance(value, (int, float)) and isinstance(total.get(key), (int, float)):
            merged[key] = total[key] + value
        elif key == "agreement":
            merged.setdefault("agreement_by_input", [total.get("agreement")])
            merged["agreement_by_input"].append(value)
    return merged
