"""``make demo``: run the ``compare`` pipeline on this machine and show what alignment did.

Writes the built-in synthetic task (a known gold preference rule, simulated annotators), runs
the ``compare`` pipeline under ``kfp.local`` on a tiny model trained from scratch (one SFT, then
DPO on one branch and a reward model + PPO on the other), and prints SFT, DPO and PPO side by
side: gold reward, win rate and KL against SFT, training time and peak memory, and the wall time
of each stage. ``--pipeline dpo`` runs the ``dpo`` pipeline (with the gate and registration)
instead. Honours ``MLFLOW_TRACKING_URI``; without it the runs go to a SQLite store in the output
folder.

This module drives the pipeline definitions in the repository's ``pipelines`` package, so it
runs from a source checkout (``make demo``), not from an installed wheel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from alignpipe import compare, synthetic

log = logging.getLogger("alignpipe.demo")

# Small enough for two CPU cores in a few minutes, large enough that DPO shows its effect. The
# DPO step is deliberately small (full fine-tuning, lr 2e-4, beta 0.5): larger steps still rank
# held-out pairs well but make greedy answers worse (repeated items), see tests/test_dpo.py.
DEMO_TASK = {"num_sft": 3000, "num_pairs": 3000, "num_prompts": 64}
DEMO_ARGUMENTS: dict[str, Any] = {
    "base_model_ref": "tiny",
    # a vocabulary large enough that every item of the task is one token
    "tiny_options": {"vocab_size": 1024, "hidden_size": 64, "num_layers": 2},
    "prep_config": {"eval_fraction": 0.1},
    "ingest_config": {"eval_fraction": 0.1},
    "sft_config": {
        "peft": {"method": "none"},  # a model trained from scratch needs all its weights
        "training": {"max_steps": 800, "learning_rate": 3e-3, "batch_size": 32, "save_steps": 200},
    },
    "dpo_config": {
        "peft": {"method": "none"},
        "beta": 0.5,
        "training": {"max_steps": 80, "learning_rate": 2e-4, "batch_size": 64, "save_steps": 40},
    },
    # sampled answers measure the policy DPO trained (a distribution); greedy answers of a model
    # this small mostly show its single mode, which repeats items
    "eval_config": {
        "num_prompts": 64,
        "samples_per_prompt": 4,
        "do_sample": True,
        "max_new_tokens": 16,
    },
}


# The RLHF branch of `compare`: a reward model from the SFT model, then PPO (LoRA on every
# linear layer, KL-penalised) against it.
COMPARE_ARGUMENTS: dict[str, Any] = {
    # both policies scored by the gold rule and by the reward model PPO optimised
    "eval_config": {**DEMO_ARGUMENTS["eval_config"], "scorers": ["gold", "reward_model"]},
    "reward_model_config": {
        "peft": {"method": "none"},
        "max_length": 64,
        "training": {"max_steps": 300, "learning_rate": 1e-3, "batch_size": 32},
    },
    "ppo_config": {
        "reward": "reward_model",
        "max_new_tokens": 16,
        "kl_coef": 0.2,
        "max_kl_to_reference": 3.0,
        "peft": {"lora": {"target_modules": ["all-linear"]}},
        "training": {
            "max_steps": 60,
            "learning_rate": 2e-3,
            "lr_scheduler": "constant",
            "save_steps": 20,
        },
    },
}
DEFAULT_PIPELINE = "compare"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignpipe.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for everything it writes")
    parser.add_argument("--experiment", default="alignpipe-demo", help="MLflow experiment")
    parser.add_argument(
        "--pipeline", choices=("compare", "dpo"), default=DEFAULT_PIPELINE, help="what to run"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
        print(f"MLFLOW_TRACKING_URI is unset: tracking to {tracking_uri}")

    # the task, then the pipeline
    task = synthetic.write_task(synthetic.SyntheticTaskOptions(**DEMO_TASK), out / "task")
    arguments = {
        **DEMO_ARGUMENTS,
        "sft_inputs": [str(task["sft"])],
        "preference_inputs": [str(task["votes"])],
        "tracking_uri": tracking_uri,
        "experiment": args.experiment,
    }
    started = time.perf_counter()
    if args.pipeline == "compare":
        arguments |= COMPARE_ARGUMENTS
    else:
        arguments["model_name"] = "alignpipe-demo"
    run_pipeline(args.pipeline, arguments, out / "kfp-local")
    minutes = (time.perf_counter() - started) / 60

    # what it did
    table = summarize(tracking_uri, args.experiment, args.pipeline)
    table["pipeline_minutes"] = round(minutes, 2)
    print_table(table)
    report = newest_report(out / "kfp-local", args.pipeline)
    for folder in {out, report.parent}:
        (folder / "demo.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\nThe report: {report} (the table as JSON beside it: demo.json)")
    print("Browse the runs (a parent run per pipeline run, a child per stage):")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    return 0


def run_pipeline(name: str, arguments: dict[str, Any], pipeline_root: Path) -> None:
    """Run a pipeline from the repository's ``pipelines`` package under kfp.local."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "pipelines").is_dir():
        raise SystemExit("the demo runs from a source checkout: `make demo` in the repository")
    sys.path.insert(0, str(repo))
    from pipelines.__main__ import run_local

    run_local(name, arguments, pipeline_root)


def newest_report(pipeline_root: Path, pipeline: str) -> Path:
    """The newest local run's report: the comparison for ``compare``, else the evaluation's."""
    pattern = (
        "*/compare-report/report" if pipeline == "compare" else "*/evaluate/evaluation/report.md"
    )
    reports = sorted(pipeline_root.glob(pattern))
    if not reports:
        raise SystemExit(f"no report under {pipeline_root}; did the pipeline run?")
    return max(reports, key=lambda p: p.stat().st_mtime)


def summarize(tracking_uri: str, experiment: str, pipeline: str) -> dict[str, Any]:
    """Headline metrics of the newest pipeline run and the wall time of each stage."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`alignpipe.stage` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    stages: dict[str, float] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        if run.info.end_time:
            name = run.data.tags.get("alignpipe.stage", "?")
            name = name if name not in stages else f"{name} ({len(stages)})"
            stages[name] = round((run.info.end_time - run.info.start_time) / 1e3, 1)
    metrics = parent.data.metrics
    # the dpo pipeline puts the evaluation's metrics on the parent as they are; compare prefixes
    # them with the branch
    branches = {"DPO": "dpo_", "PPO": "ppo_"} if pipeline == "compare" else {"DPO": ""}
    first = next(iter(branches.values()))
    rows = {"SFT": {"gold_reward": metrics.get(f"{first}gold_reward_reference")}}
    for label, prefix in branches.items():
        rows[label] = {
            "gold_reward": metrics.get(f"{prefix}gold_reward_policy"),
            "win_rate_vs_sft": metrics.get(f"{prefix}gold_win_rate"),
            "kl_to_sft": metrics.get(f"{prefix}kl_policy_reference"),
            "train_seconds": metrics.get(f"{prefix}train_seconds"),
            "peak_rss_mb": metrics.get(f"{prefix}peak_rss_mb"),
            "stopped_at_kl_bound_after": (
                metrics.get(f"{prefix}iterations")
                if metrics.get(f"{prefix}stopped_at_kl_bound")
                else None
            ),
        }
    return {
        "pipeline": pipeline,
        "parent_run_id": parent.info.run_id,
        "status": parent.info.status,
        "models": rows,
        "gate_passed": bool(metrics.get("passed")) if pipeline != "compare" else None,
        "stage_seconds": stages,
    }


def print_table(table: dict[str, Any]) -> None:
    def fmt(value: Any) -> str:
        return "" if value is None else f"{value:.3f}"

    columns = ("gold reward", "win rate vs SFT", "KL to SFT", "train s", "peak MiB")
    keys = ("gold_reward", "win_rate_vs_sft", "kl_to_sft", "train_seconds", "peak_rss_mb")
    print("\n" + f"{'model':<6}" + "".join(f"{c:>17}" for c in columns))
    for name, row in table["models"].items():
        print(f"{name:<6}" + "".join(f"{fmt(row.get(k)):>17}" for k in keys))
    for name, row in table["models"].items():
        if row.get("stopped_at_kl_bound_after"):
            print(compare.stop_note(name, row["stopped_at_kl_bound_after"]))
    if table["gate_passed"] is not None:
        print(f"\ngate passed: {table['gate_passed']}")
    print(f"pipeline {table['pipeline']}: {table['status']}")
    print(
        "wall time per stage (s): "
        + ", ".join(f"{k} {v}" for k, v in table["stage_seconds"].items())
    )


if __name__ == "__main__":
    sys.exit(main())
