"""Data prep stage: turn raw instruction or pair data into clean train/eval splits.

Reads any supported file and layout, normalizes to conversations (for SFT) or text pairs (for
contrastive training), quarantines unusable rows with reasons, splits deterministically by
prompt, and writes the splits, the quarantine and the stats.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from alignpipe.config import flatten, option
from alignpipe.data.build import (
    DataOptions,
    DataResult,
    build,
    collect,
    load_tokenizer,
    log_result,
    write,
)
from alignpipe.data.records import message
from alignpipe.data.validate import Candidate
from alignpipe.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


@dataclass
class PrepConfig(DataOptions):
    """Data prep: raw instruction/chat/pair data to canonical conversations or text pairs."""

    task: str | None = option(
        None, help="Tag conversations with this task name (used by multitask training)."
    )


def run(
    config: PrepConfig,
    inputs: Sequence[str],
    output: str,
    tracker: Tracker | None = None,
) -> DataResult:
    """Read, normalize, validate, split and write; returns the result with its stats."""
    tracker = tracker or NullTracker()
    tracker.log_params(flatten(config))

    # read and normalize; preference data becomes SFT conversations on the chosen side
    layout, shape, candidates, unparsed = collect(
        inputs, config, ("conversation", "text_pair", "preference")
    )
    eval_candidates = None
    if config.eval_inputs:
        _, _, eval_candidates, eval_unparsed = collect(config.eval_inputs, config, (shape,))
        unparsed += eval_unparsed
    if shape == "preference":
        candidates = [_chosen_conversation(c) for c in candidates]
        eval_candidates = eval_candidates and [_chosen_conversation(c) for c in eval_candidates]
        shape = "conversation"
    if config.task is not None and shape == "conversation":
        for cand in [*candidates, *(eval_candidates or [])]:
            cand.record["task"] = config.task

    # validate, split, count
    tokenizer = load_tokenizer(config.tokenizer)
    result = build(
        shape, candidates, eval_candidates, unparsed, config, tokenizer=tokenizer, layout=layout
    )

    # write and log
    files = write(result, output)
    log_result(tracker, result, files)
    log.info(
        "prep: read %d, kept %d, quarantined %d (format %s)",
        result.stats["read"],
        result.stats["kept"],
        result.stats["quarantined"],
        layout,
    )
    return result


def _chosen_conversation(cand: Candidate) -> Candidate:
    record = cand.record
    messages = [*record["prompt"], *(message("assistant", m["content"]) for m in record["chosen"])]
    return Candidate({"messages": messages, "task": None}, cand.source, cand.lines)
