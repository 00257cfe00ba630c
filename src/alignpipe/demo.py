"""``make demo``: run the ``dpo`` pipeline on this machine and show what alignment did.

Writes the built-in synthetic task (a known gold preference rule, simulated annotators), runs
the ``dpo`` pipeline under ``kfp.local`` on a tiny model trained from scratch, then prints SFT
against DPO on the gold reward, win rate and KL, with the wall time of each stage, and says how
to open the runs in the MLflow UI. Honours ``MLFLOW_TRACKING_URI``; without it the runs go to a
SQLite store in the output folder.

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

from alignpipe import synthetic

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignpipe.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for everything it writes")
    parser.add_argument("--experiment", default="alignpipe-demo", help="MLflow experiment")
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
    run_pipeline("dpo", arguments, out / "kfp-local")
    minutes = (time.perf_counter() - started) / 60

    # what it did
    table = summarize(tracking_uri, args.experiment)
    table["pipeline_minutes"] = round(minutes, 2)
    print_table(table)
    report = newest_report(out / "kfp-local")
    for folder in {out, report.parent}:
        (folder / "demo.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\nThe evaluation report: {report} (the table as JSON beside it: demo.json)")
    print("Browse the runs (parent run with a child per stage, and the registered model):")
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


def newest_report(pipeline_root: Path) -> Path:
    """The evaluation report of the newest local pipeline run."""
    reports = sorted(pipeline_root.glob("*/evaluate/evaluation/report.md"))
    if not reports:
        raise SystemExit(f"no evaluation report under {pipeline_root}; did the pipeline run?")
    return max(reports, key=lambda p: p.stat().st_mtime)


def summarize(tracking_uri: str, experiment: str) -> dict[str, Any]:
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
    stages = {
        run.data.tags.get("alignpipe.stage"): round(
            (run.info.end_time - run.info.start_time) / 1e3, 1
        )
        for run in children
        if run.info.end_time
    }
    metrics = parent.data.metrics
    return {
        "parent_run_id": parent.info.run_id,
        "status": parent.info.status,
        "sft": {"gold_reward": metrics.get("gold_reward_reference")},
        "dpo": {
            "gold_reward": metrics.get("gold_reward_policy"),
            "win_rate_vs_sft": metrics.get("gold_win_rate"),
            "kl_to_sft": metrics.get("kl_policy_reference"),
        },
        "gate_passed": bool(metrics.get("passed")),
        "stage_seconds": stages,
    }


def print_table(table: dict[str, Any]) -> None:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"\n{'model':<6}{'gold reward':>13}{'win rate vs SFT':>17}{'KL to SFT':>11}")
    print(f"{'SFT':<6}{fmt(table['sft']['gold_reward']):>13}{'':>17}{'':>11}")
    dpo = table["dpo"]
    print(
        f"{'DPO':<6}{fmt(dpo['gold_reward']):>13}{fmt(dpo['win_rate_vs_sft']):>17}"
        f"{fmt(dpo['kl_to_sft']):>11}"
    )
    print(f"\ngate passed: {table['gate_passed']}; pipeline {table['status']}")
    print(
        "wall time per stage (s): "
        + ", ".join(f"{k} {v}" for k, v in table["stage_seconds"].items())
    )


if __name__ == "__main__":
    sys.exit(main())
