"""The comparison report of alignment methods run side by side on the same SFT model.

Each branch (DPO; reward model + PPO; ...) brings its evaluation metrics (against the same SFT
model, on the same prompts, with the same scorers) and the metrics of its training stages. The
report puts quality (reward under each scorer, win rate, KL, response length) next to cost
(training wall time, tokens processed, peak memory), so "DPO or RLHF?" becomes a measurement.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignpipe import reports

log = logging.getLogger(__name__)

REPORT = "comparison"
# quality rows: (label, metric name suffix or name in the evaluation metrics)
QUALITY = (
    ("win rate vs SFT", "gold_win_rate"),
    ("KL to SFT", "kl_policy_reference"),
    ("response tokens", "response_tokens_policy_mean"),
    ("preference accuracy", "preference_accuracy"),
)
# cost rows: (label, key of Branch.cost())
COST = (
    ("training seconds", "train_seconds"),
    ("tokens processed", "train_tokens"),
    ("peak memory (MiB)", "peak_rss_mb"),
)


@dataclass
class Branch:
    """One alignment method: its evaluation metrics and its training stages' metrics."""

    name: str
    evaluation: Mapping[str, float]
    stages: Sequence[Mapping[str, float]]

    def cost(self) -> dict[str, float]:
        """Training wall time and tokens summed over the branch's stages; the largest peak.

        A cost that some stage of the branch does not report is left out rather than
        understated.
        """
        cost = {}
        for key, combine in (("train_seconds", sum), ("train_tokens", sum), ("peak_rss_mb", max)):
            if self.stages and all(key in s for s in self.stages):
                cost[key] = float(combine(s[key] for s in self.stages))
        return cost

    def stopped_early(self) -> dict[str, float]:
        """``stopped_at_kl_bound`` and ``iterations`` of a stage that ended at its KL bound.

        Such a stage trained fewer iterations than configured and kept its last policy within
        the bound; a reader of the comparison needs to know it, since its cost is then smaller
        too. Empty when no stage of the branch stopped there.
        """
        for stage in self.stages:
            if stage.get("stopped_at_kl_bound"):
                return {"stopped_at_kl_bound": 1.0, "iterations": float(stage["iterations"])}
        return {}


def compare(branches: Sequence[Branch], output: str | Path) -> dict[str, float]:
    """Write ``comparison.md``, ``.html`` and ``.json`` under ``output``; return flat metrics.

    Metrics are named ``<branch>_<metric>``, e.g. ``dpo_gold_reward_policy`` and
    ``ppo_train_seconds``, so MLflow's comparison view lines runs up by them.
    """
    if len(branches) < 2:
        raise ValueError("a comparison needs at least two branches")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for branch in branches:
        for key, value in {**branch.evaluation, **branch.cost(), **branch.stopped_early()}.items():
            metrics[f"{branch.name}_{key}"] = float(value)
    (out / "comparison.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(branches, out)
    log.info("comparison of %s written to %s", ", ".join(b.name for b in branches), out)
    return metrics


INTRO = (
    "Every branch starts from the same SFT model and is evaluated against it on the same "
    "held-out prompts with the same scorers and generation settings. Cost sums the branch's "
    "training stages (a reward model and PPO for RLHF); peak memory is the largest of its "
    "stages' processes."
)


def write_report(branches: Sequence[Branch], output: Path) -> Path:
    """Write ``comparison.md`` (KFP renders it in the run's UI) and ``comparison.html``."""
    reference = branches[0].evaluation
    scorers = sorted(
        k.removesuffix("_reward_policy") for k in reference if k.endswith("_reward_policy")
    )
    rows = []
    for scorer in scorers:
        sft = _fmt(reference.get(f"{scorer}_reward_reference"))
        rows.append(
            [
                f"{scorer} reward",
                sft,
                *(_fmt(b.evaluation.get(f"{scorer}_reward_policy")) for b in branches),
            ]
        )
    for label, key in QUALITY:
        sft = "0.5" if key.endswith("win_rate") else ""
        if key == "response_tokens_policy_mean":
            sft = _fmt(reference.get("response_tokens_reference_mean"))
        rows.append([label, sft, *(_fmt(b.evaluation.get(key)) for b in branches)])
    for label, key in COST:
        rows.append([label, "", *(_fmt(b.cost().get(key)) for b in branches)])
    stops = {b.name: b.stopped_early() for b in branches}
    notes = [stop_note(name, stop["iterations"]) for name, stop in stops.items() if stop]
    header = ["", "SFT", *(b.name for b in branches)]
    return reports.write_table(
        "Alignment methods compared", header, rows, output, intro=INTRO, notes=notes, name=REPORT
    )


def stop_note(name: str, iterations: float) -> str:
    """The line that says a branch's PPO ended at its KL bound (the report's, the demo's)."""
    return (
        f"{name} stopped at its KL bound after {iterations:.0f} iterations and kept the last "
        "policy within the bound."
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"
