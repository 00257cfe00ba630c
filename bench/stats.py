"""The arithmetic and parsing of the benchmarks, kept free of I/O so that it can be tested.

Paired runs are summarised by each side's median and by the median of the per-pair ratios (the
method in the project's benchmark notes); peak memory is read from GNU time's ``-v`` report.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Any

# GNU time prints "Command exited with non-zero status N" first when the command failed, then
# one "label: value" line per measure, each indented by a tab.
_TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "elapsed_s",
    "Exit status": "exit_status",
}


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence of numbers.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("median of no values; run at least one counted pair")
    return float(statistics.median(values))


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-pair ratios ``numerators[i] / denominators[i]``.

    Raises:
        ValueError: The sequences differ in length, or a denominator is not positive.
    """
    if len(numerators) != len(denominators):
        raise ValueError(
            f"paired runs need as many values on each side, got {len(numerators)} and "
            f"{len(denominators)}"
        )
    for value in denominators:
        if value <= 0:
            raise ValueError(f"a ratio's denominator must be positive, got {value}")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def summarize_pairs(
    a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")
) -> dict[str, Any]:
    """Summarise paired measurements: each side's values and median, the ratios a/b, their median.

    The median of per-pair ratios is not the ratio of the medians: each pair ran back to back, so
    its ratio cancels what the shared machine was doing at that moment.

    Args:
        a: One value per pair for the first side (the numerator).
        b: One value per pair for the second side (the denominator).
        names: Keys under which the two sides are stored.

    Returns:
        ``{names[0]: {"values", "median"}, names[1]: {...}, "ratios": [...], "median_ratio"}``.
    """
    ratios = paired_ratios(a, b)
    return {
        names[0]: {"values": list(a), "median": median(a)},
        names[1]: {"values": list(b), "median": median(b)},
        "ratios": ratios,
        "median_ratio": median(ratios),
    }


def parse_clock(text: str) -> float:
    """Seconds in a GNU time clock reading: ``m:ss.cc`` or ``h:mm:ss``.

    Raises:
        ValueError: The text is not such a reading.
    """
    parts = text.strip().split(":")
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"not a clock reading (m:ss or h:mm:ss): {text!r}")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"not a clock reading (m:ss or h:mm:ss): {text!r}") from None
    seconds = 0.0
    for number in numbers:
        seconds = seconds * 60 + number
    return seconds


def parse_time_v(report: str) -> dict[str, float]:
    """Read the measures of a ``/usr/bin/time -v`` report.

    Args:
        report: What GNU time wrote (with ``-o FILE``, or the tail of the command's stderr).

    Returns:
        ``max_rss_kb``, ``user_s``, ``system_s``, ``elapsed_s`` and ``exit_status``, those that
        the report holds; ``max_rss_kb`` is always there.

    Raises:
        ValueError: The report has no "Maximum resident set size" line.
    """
    found: dict[str, float] = {}
    for line in report.splitlines():
        label, sep, value = line.strip().rpartition(": ")
        if not sep:
            continue
        key = _TIME_FIELDS.get(label)
        if key == "elapsed_s":
            found[key] = parse_clock(value)
        elif key is not None:
            found[key] = float(value)
    if "max_rss_kb" not in found:
        raise ValueError("no 'Maximum resident set size' line: is this GNU time's -v output?")
    failed = re.search(r"Command exited with non-zero status (\d+)", report)
    if failed and "exit_status" not in found:
        found["exit_status"] = float(failed.group(1))
    return found


def markdown_table(result: dict[str, Any]) -> str:
    """The README's tables for one benchmark result (the JSON written by ``python -m bench``).

    Args:
        result: The parsed JSON of one run.

    Returns:
        Markdown: a machine line, then a table per comparison with both medians and the median
        of per-pair ratios for each measure.
    """
    machine = result["machine"]
    versions = machine["versions"]
    lines = [
        f"Measured {result['date']} on {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gb']:.0f} GB RAM, {machine.get('threads', '?')} torch thread(s); "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"trl {versions['trl']}, peft {versions['peft']}.",
    ]
    overhead = result.get("overhead")
    if overhead:
        pairs = len(overhead["metrics"]["process_s"]["ratios"])
        lines += [
            "",
            f"| DPO, tiny model, {pairs} pairs | alignpipe stage | TRL `DPOTrainer` direct "
            "| ratio |",
            "|---|---|---|---|",
        ]
        for key, label in OVERHEAD_MEASURES:
            metric = overhead["metrics"].get(key)
            if metric is not None:
                lines.append(
                    f"| {label} | {metric['alignpipe']['median']:.2f} s | "
                    f"{metric['trl']['median']:.2f} s | {metric['median_ratio']:.2f} |"
                )
    memory = result.get("memory")
    if memory:
        metric = memory["metrics"]["max_rss_mb"]
        params = memory["model"]["parameters"] / 1e6
        lines += [
            "",
            f"| DPO reference, {params:.0f}M-parameter model, {len(metric['ratios'])} pairs "
            "| LoRA adapter off | full copy | ratio |",
            "|---|---|---|---|",
            f"| peak RSS | {metric['lora']['median']:.0f} MB | {metric['full']['median']:.0f} MB "
            f"| {metric['median_ratio']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


# The overhead measures in the order they are reported, with their table labels.
OVERHEAD_MEASURES = (
    ("process_s", "whole process"),
    ("stage_s", "stage (imports excluded)"),
    ("train_s", "train() only"),
)
