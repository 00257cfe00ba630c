"""One configuration of the DPO benchmark in one fresh process.

``python -m bench.dpo_worker {alignpipe,trl} --data DIR --model DIR --output DIR --settings FILE
--result FILE`` runs DPO once, either through alignpipe's DPO stage or with TRL's
``DPOTrainer`` called directly as TRL's documentation shows, and writes its in-process timings
as JSON. The parent (``bench.dpo``) times the whole process and reads its peak memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The preference columns DPO trains on; the ingest stage's other columns (margin, annotator,
# source) carry no signal for the sigmoid loss.
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def main(argv: list[str] | None = None) -> int:
    """Run one side of the benchmark and write ``{"import_s", "stage_s", "train_s"}``."""
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_worker", description=__doc__)
    parser.add_argument("side", choices=("alignpipe", "trl"))
    parser.add_argument("--data", required=True, help="ingest output folder (preference pairs)")
    parser.add_argument("--model", required=True, help="model folder both sides start from")
    parser.add_argument("--output", required=True, help="folder for checkpoints and the model")
    parser.add_argument("--settings", required=True, help="JSON file of the shared settings")
    parser.add_argument("--result", required=True, help="where to write the timings as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))

    # The libraries both sides run on are imported before the stage clock starts, so that the
    # stage time of each side covers the same kind of work; the parent's whole-process time
    # counts the imports, equally for both.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    torch.set_num_threads(settings["threads"])
    if args.side == "alignpipe":
        from alignpipe import dpo  # noqa: F401  (its own import is not part of the stage time)

        imported = time.perf_counter()
        timings = run_alignpipe(settings, args.data, args.model, args.output)
    else:
        imported = time.perf_counter()
        timings = run_trl(settings, args.data, args.model, args.output)
    timings["import_s"] = imported - started
    Path(args.result).write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    return 0


def alignpipe_overrides(settings: dict[str, Any], model: str) -> dict[str, Any]:
    """The DPO stage's options for the shared benchmark settings."""
    lora = settings["lora"]
    return {
        "model": model,
        "beta": settings["beta"],
        "loss_type": settings["loss_type"],
        "max_length": settings["max_length"],
        "precompute_ref_log_probs": False,
        "dtype": "float32",
        "peft.method": settings["peft"],
        "peft.lora.r": lora["r"],
        "peft.lora.alpha": lora["alpha"],
        "peft.lora.dropout": lora["dropout"],
        "peft.lora.target_modules": lora["target_modules"],
        "training.max_steps": settings["steps"],
        "training.batch_size": settings["batch_size"],
        "training.learning_rate": settings["learning_rate"],
        "training.seed": settings["seed"],
        "training.num_threads": settings["threads"],
        "training.logging_steps": settings["logging_steps"],
        "training.save_steps": settings["save_steps"],
        "training.precision": "fp32",
        "training.gradient_checkpointing": False,
    }


def run_alignpipe(settings: dict[str, Any], data: str, model: str, output: str) -> dict[str, Any]:
    """The DPO stage as a pipeline runs it: evaluate, train, evaluate, save the model."""
    from alignpipe import dpo
    from alignpipe.config import load_config

    started = time.perf_counter()
    config = load_config(dpo.DpoStageConfig, None, alignpipe_overrides(settings, model))
    result = dpo.run(config, data, output)
    stage_s = time.perf_counter() - started
    return {
        "stage_s": stage_s,
        "train_s": result.metrics.get("train_seconds"),
        "global_step": result.metrics.get("global_step"),
    }


def run_trl(settings: dict[str, Any], data: str, model: str, output: str) -> dict[str, Any]:
    """TRL's ``DPOTrainer`` called directly: the same data, model, settings and evaluations."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()

    # data: the ingest stage's conversational preference pairs
    def split(name: str) -> Dataset:
        table = pq.read_table(Path(data) / f"{name}.parquet", columns=list(PAIR_COLUMNS))
        return Dataset.from_list(table.to_pylist())

    train_dataset, eval_dataset = split("train"), split("eval")

    # model and trainer, configured the way TRL's DPO documentation shows
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lora = settings["lora"]
    peft_config = None
    if settings["peft"] == "lora":
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
        )
    args = DPOConfig(
        output_dir=str(Path(output) / "checkpoints"),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        seed=settings["seed"],
        beta=settings["beta"],
        loss_type=[settings["loss_type"]],
        max_length=settings["max_length"],
        logging_steps=settings["logging_steps"],
        save_steps=settings["save_steps"],
        # TRL's defaults are bf16 and gradient checkpointing, which fail or crawl on a CPU
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    # evaluate before and after training, as the alignpipe stage does, and save the model
    trainer.evaluate()
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started
    trainer.evaluate()
    trainer.save_model(str(Path(output) / "model"))
    return {
        "stage_s": time.perf_counter() - started,
        "train_s": train_s,
        "global_step": float(trainer.state.global_step),
    }


if __name__ == "__main__":
    raise SystemExit(main())
