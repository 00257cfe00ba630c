"""``make demo``: the built-in synthetic task through the stages alignpipe has today.

Writes the synthetic task, builds a tiny model and its tokenizer from the task's text, prepares
the SFT conversations and ingests the simulated annotators' votes (both checked against the
tokenizer's chat template), logging every stage to MLflow under one parent run. Then prints
what each stage kept and where to look. Honours ``MLFLOW_TRACKING_URI``; without it the runs go
to a SQLite store in the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from alignpipe import ingest, models, prep, synthetic
from alignpipe.config import load_config
from alignpipe.tracking import end_pipeline_run, stage_run, start_pipeline_run

log = logging.getLogger("alignpipe.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignpipe.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for everything it writes")
    parser.add_argument("--experiment", default="alignpipe-demo", help="MLflow experiment")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    parent = start_pipeline_run(tracking_uri, args.experiment, "demo", {"pipeline": "demo"})
    rows, status = [], "FAILED"
    try:
        rows = _stages(out, tracking_uri, args.experiment, parent)
        status = "FINISHED"
    finally:
        end_pipeline_run(tracking_uri, parent, status)

    print(f"\n{'stage':<12}{'read':>8}{'kept':>8}{'quarantined':>13}{'seconds':>9}  notes")
    for row in rows:
        print(
            f"{row['stage']:<12}{row.get('read', ''):>8}{row.get('kept', ''):>8}"
            f"{row.get('quarantined', ''):>13}{row['seconds']:>9.1f}  {row.get('notes', '')}"
        )
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nOutputs in {out}; the table as JSON in {out / 'demo.json'}.")
    print(f"MLflow runs in {tracking_uri} (parent run {parent}). To browse them:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    return 0


def _stages(out: Path, tracking_uri: str, experiment: str, parent: str) -> list[dict]:
    rows = []

    def timed(stage: str, fn):
        start = time.perf_counter()
        with stage_run(
            stage, tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent
        ) as tracker:
            result = fn(tracker)
        return result, time.perf_counter() - start

    # the task: SFT demonstrations, prompts and multi-annotator votes with a known gold rule
    task_options = synthetic.SyntheticTaskOptions(num_sft=1000, num_pairs=500)
    paths, seconds = timed("synth", lambda t: synthetic.write_task(task_options, out / "task"))
    rows.append({"stage": "synth", "seconds": seconds, "notes": f"files in {out / 'task'}"})

    # a tiny model whose tokenizer is trained on the task's text
    model_dir = out / "tiny-model"
    (model, _), seconds = timed(
        "tiny-model",
        lambda t: models.build_tiny_model(
            synthetic.corpus(task_options), models.TinyModelOptions(), str(model_dir)
        ),
    )
    notes = f"{model.num_parameters():,} parameters"
    rows.append({"stage": "tiny-model", "seconds": seconds, "notes": notes})

    # data prep of the SFT conversations, ingest of the votes; both check the chat template
    checks = [f"tokenizer={model_dir}", "max_length=128"]
    prep_cfg = load_config(prep.PrepConfig, None, [*checks, "task=synthetic"])
    result, seconds = timed(
        "prep", lambda t: prep.run(prep_cfg, [str(paths["sft"])], str(out / "sft-data"), t)
    )
    rows.append({"stage": "prep", "seconds": seconds, **_counts(result.stats)})
    ingest_cfg = load_config(ingest.IngestConfig, None, checks)
    result, seconds = timed(
        "ingest",
        lambda t: ingest.run(ingest_cfg, [str(paths["votes"])], str(out / "preferences"), t),
    )
    agreement = result.stats.get("agreement", {})
    kappa = next((v for k, v in agreement.items() if "kappa" in k), None)
    notes = f"{result.stats.get('judgements', '?')} judgements"
    if kappa is not None:
        notes += f", Fleiss' kappa {kappa:.2f}"
    rows.append({"stage": "ingest", "seconds": seconds, **_counts(result.stats), "notes": notes})
    return rows


def _counts(stats: dict) -> dict:
    return {k: stats[k] for k in ("read", "kept", "quarantined")}


if __name__ == "__main__":
    sys.exit(main())
