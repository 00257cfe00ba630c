"""The RLHF half of ``make bench``: what one PPO pass costs beside DPO, and what the KV cache buys.

- ppo_vs_dpo: the PPO stage against the DPO stage, each run once through the ``alignpipe`` CLI
  in a fresh process, alternating, on the demo's task and settings: the same SFT model, the
  same ingested pairs (DPO trains on the pairs, PPO answers their distinct prompts and scores
  the answers with a reward model trained on the same pairs). Each side runs for about one pass
  over its data: DPO one epoch of the training pairs, PPO enough rollouts to answer every
  distinct training prompt once. The stages' own ``train_seconds`` (training only: no loading,
  evaluation or saving) are scaled to exactly one pass and compared.
- generation: :func:`alignpipe.evaluate.generate_responses` (what PPO rollouts and the
  evaluation stage call) with and without the KV cache, alternating in one process, greedy, on
  the SFT model of the task and on a wider random model that always answers to full length.
  Tokens/s counts generated tokens, so a side that stopped earlier cannot look faster.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import REPO, worker_env
from bench.stats import summarize_pairs

log = logging.getLogger("bench.rlhf")


# Short SFT and reward-model runs are enough: the benchmark times PPO and DPO, not their quality,
# but the policy has to answer like the task's SFT model (response lengths drive PPO's cost).
SFT_STEPS = 400
REWARD_MODEL_STEPS = 100
# Generation: greedy answers to the first prompts of the task, in batches like a rollout's;
# prompts per model so that each side of a round takes long enough to time (the SFT model's
# answers are a few tokens long, the wide model's always max_new_tokens).
GENERATION = {"batch_size": 16, "max_new_tokens": 64}
GENERATION_PROMPTS = {"sft": 256, "wide random": 32}
# A wider model with random weights: it never ends an answer early, so every row generates
# max_new_tokens, and its layers cost enough that the attention over the prefix shows.
WIDE_MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "intermediate_size": 1024}

PPO_WHAT = (
    "Training time of one pass over the data, each stage in its own fresh process through the "
    "alignpipe CLI, the two alternating: DPO = one epoch over the training pairs; PPO = "
    "rollouts that answer as many prompts as there are distinct training prompts (sample, "
    "score with the reward model, KL against the reference, then the PPO epochs over each "
    "rollout). train_s is the stage's own train_seconds metric scaled to exactly one pass; "
    "process_s is the whole process, with loading, the before/after evaluation and saving. "
    "Settings are the demo's (make demo) for both stages. Ratio is PPO / DPO."
)
GENERATION_WHAT = (
    "Generated tokens per second of alignpipe.evaluate.generate_responses, greedy, batched and "
    "left-padded, with the KV cache (use_cache=True, what alignpipe runs) and without it "
    "(every new token recomputes the whole sequence), alternating in one process. Ratio is "
    "with / without."
)


@dataclass
class Fixtures:
    """The pairs and models both sides start from."""

    pairs: Path
    sft_model: Path
    reward_model: Path
    wide_model: Path
    train_pairs: int
    train_prompts: int


def run(work: Path, args: argparse.Namespace, only: str) -> dict[str, Any]:
    """Build the fixtures, then run the comparisons ``only`` asks for (``all`` = both)."""
    fixtures = prepare_fixtures(work / "fixtures")
    result: dict[str, Any] = {}
    if only in ("all", "ppo"):
        result["ppo_vs_dpo"] = run_ppo_vs_dpo(fixtures, work, args)
    if only in ("all", "generation"):
        result["generation"] = run_generation(fixtures, work, args)
    return result


# ---------------------------------------------------------------------------------------------
# fixtures


def prepare_fixtures(work: Path) -> Fixtures:
    """The demo's task, ingested and prepared; an SFT model; a reward model; a wide model."""
    from alignpipe import demo, models, ppo, synthetic
    from alignpipe.runner import run_stage

    options = synthetic.SyntheticTaskOptions(**demo.DEMO_TASK)
    task = synthetic.write_task(options, work / "task")
    arguments = demo.DEMO_ARGUMENTS
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # fixtures are not runs anyone compares

    # data: conversations for SFT, pairs for DPO, PPO and the reward model
    conversations, pairs = work / "conversations", work / "pairs"
    run_stage("prep", [str(task["sft"])], str(conversations), overrides=arguments["prep_config"])
    run_stage("ingest", [str(task["votes"])], str(pairs), overrides=arguments["ingest_config"])

    # models: the demo's tiny model, SFT-trained briefly; a reward model on the pairs
    base = work / "base-model"
    tiny, tokenizer = models.build_tiny_model(
        synthetic.corpus(options), models.TinyModelOptions(**arguments["tiny_options"]), str(base)
    )
    sft = work / "sft"
    sft_config = _with_steps(arguments["sft_config"], SFT_STEPS)
    run_stage("sft", str(conversations), str(sft), overrides={**sft_config, "model": str(base)})
    reward = work / "reward-model"
    reward_config = _with_steps(demo.COMPARE_ARGUMENTS["reward_model_config"], REWARD_MODEL_STEPS)
    run_stage(
        "reward_model", str(pairs), str(reward), overrides={**reward_config, "model": str(sft)}
    )
    del tiny

    wide = work / "wide-model"
    wide_options = models.TinyModelOptions(**{**arguments["tiny_options"], **WIDE_MODEL})
    models.save_model(models.build_tiny_causal_lm(wide_options, tokenizer), tokenizer, str(wide))

    import pyarrow.parquet as pq

    train_pairs = pq.read_metadata(pairs / "train.parquet").num_rows
    train_prompts = len(ppo.load_prompts(str(pairs), "train"))
    log.info("rlhf fixtures: %d train pairs, %d distinct prompts", train_pairs, train_prompts)
    return Fixtures(pairs, sft, reward, wide, train_pairs, train_prompts)


def _with_steps(config: dict[str, Any], steps: int) -> dict[str, Any]:
    return {**config, "training": {**config.get("training", {}), "max_steps": steps}}


# ---------------------------------------------------------------------------------------------
# PPO against DPO


def stage_configs(fixtures: Fixtures, threads: int) -> dict[str, dict[str, Any]]:
    """The demo's DPO and PPO options, sized to one pass over the data, on ``threads``."""
    from alignpipe import demo

    dpo = demo.DEMO_ARGUMENTS["dpo_config"]
    dpo_batch = dpo["training"]["batch_size"]
    ppo = demo.COMPARE_ARGUMENTS["ppo_config"]
    rollout = ppo.get("rollout_batch_size", 64)
    never = 10**6  # no checkpoint inside the timed pass
    return {
        "dpo": {
            **dpo,
            "model": str(fixtures.sft_model),
            "training": {
                **dpo["training"],
                "max_steps": math.ceil(fixtures.train_pairs / dpo_batch),
                "save_steps": never,
                "num_threads": threads,
            },
        },
        "ppo": {
            **ppo,
            "model": str(fixtures.sft_model),
            "reward_model": str(fixtures.reward_model),
            "rollout_batch_size": rollout,
            # the bound could end the pass early; the cost of a whole pass is what is measured
            "max_kl_to_reference": None,
            "eval_prompts": 16,
            "training": {
                **ppo["training"],
                "max_steps": math.ceil(fixtures.train_prompts / rollout),
                "save_steps": never,
                "num_threads": threads,
            },
        },
    }


def run_ppo_vs_dpo(fixtures: Fixtures, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate PPO and DPO runs; summarise their per-pass training time and process time."""
    configs = stage_configs(fixtures, args.threads)
    files = {}
    for stage, config in configs.items():
        files[stage] = work / f"{stage}-config.yaml"
        files[stage].write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    passes = {
        "dpo": configs["dpo"]["training"]["max_steps"]
        * configs["dpo"]["training"]["batch_size"]
        / fixtures.train_pairs,
        "ppo": configs["ppo"]["training"]["max_steps"]
        * configs["ppo"]["rollout_batch_size"]
        / fixtures.train_prompts,
    }

    runs = []
    total = args.warmup + args.pairs
    for index in range(total):
        row: dict[str, Any] = {"index": index, "warmup": index < args.warmup}
        for stage in ("ppo", "dpo"):
            row[stage] = run_stage_process(
                stage, fixtures.pairs, files[stage], work / "runs" / f"{stage}-{index}", args
            )
            row[stage]["train_s_per_pass"] = row[stage]["train_s"] / passes[stage]
        log.info(
            "ppo vs dpo %d/%d%s: ppo %.1f s, dpo %.1f s per pass",
            index + 1,
            total,
            " (warm-up)" if row["warmup"] else "",
            row["ppo"]["train_s_per_pass"],
            row["dpo"]["train_s_per_pass"],
        )
        runs.append(row)

    counted = [r for r in runs if not r["warmup"]]
    metrics = {
        key: summarize_pairs(
            [r["ppo"][key] for r in counted], [r["dpo"][key] for r in counted], ("ppo", "dpo")
        )
        for key in ("train_s_per_pass", "process_s")
    }
    return {
        "what": PPO_WHAT,
        "data": {"train_pairs": fixtures.train_pairs, "train_prompts": fixtures.train_prompts},
        "passes": passes,
        "settings": configs,
        "runs": runs,
        "metrics": metrics,
    }


def run_stage_process(
    stage: str, data: Path, config: Path, folder: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Run one stage through the CLI in a fresh process; its timings and token counts."""
    folder.mkdir(parents=True)
    output, log_file = folder / "output", folder / "run.log"
    command = [sys.executable, "-m", "alignpipe.cli", stage, str(data), "--output", str(output)]
    command += ["--config", str(config)]
    with log_file.open("w", encoding="utf-8") as handle:
        started = time.perf_counter()
        process = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(args.threads)
        )
        elapsed = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{stage} run failed (exit {process.returncode}); log {log_file}:\n{tail}")
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    return {
        "process_s": elapsed,
        "train_s": metrics["train_seconds"],
        "train_tokens": metrics["train_tokens"],
    }


# ---------------------------------------------------------------------------------------------
# generation with and without the KV cache


def run_generation(fixtures: Fixtures, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Time generation with and without the cache, per model, in a fresh process each."""
    result: dict[str, Any] = {"what": GENERATION_WHAT, "settings": GENERATION, "models": {}}
    for name, model in (("sft", fixtures.sft_model), ("wide random", fixtures.wide_model)):
        out = work / f"generation-{name.replace(' ', '-')}.json"
        command = [sys.executable, "-m", "bench.generation_worker", "--model", str(model)]
        command += ["--data", str(fixtures.pairs), "--result", str(out)]
        settings = {**GENERATION, "prompts": GENERATION_PROMPTS[name]}
        command += ["--settings", json.dumps(settings), "--threads", str(args.threads)]
        command += ["--rounds", str(args.warmup + args.pairs), "--warmup", str(args.warmup)]
        subprocess.run(command, check=True, env=worker_env(args.threads), cwd=REPO)
        measured = json.loads(out.read_text(encoding="utf-8"))
        counted = [r for r in measured["rounds"] if not r["warmup"]]
        if not all(r["same_tokens"] for r in measured["rounds"]):
            log.warning("generation, %s model: the two sides generated different tokens", name)
        measured["metrics"] = {
            "tokens_per_s": summarize_pairs(
                [r["cache"]["tokens_per_s"] for r in counted],
                [r["no_cache"]["tokens_per_s"] for r in counted],
                ("cache", "no_cache"),
            )
        }
        log.info(
            "generation, %s model: %.0f tokens/s with the cache, %.0f without",
            name,
            measured["metrics"]["tokens_per_s"]["cache"]["median"],
            measured["metrics"]["tokens_per_s"]["no_cache"]["median"],
        )
        result["models"][name] = measured
    return result


# ---------------------------------------------------------------------------------------------
# report


def text_report(result: dict[str, Any]) -> list[str]:
    """Lines of the side-by-side tables for the RLHF comparisons in a result."""
    lines: list[str] = []
    versus = result.get("ppo_vs_dpo")
    if versus:
        data, metrics = versus["data"], versus["metrics"]
        lines += [
            "",
            f"PPO vs DPO, one pass: {data['train_pairs']} training pairs, "
            f"{data['train_prompts']} distinct prompts; demo settings; "
            f"{len(metrics['process_s']['ratios'])} counted pairs",
            f"{'measure':<26}{'PPO':>12}{'DPO':>12}{'ratio':>8}",
        ]
        for key, label in (("train_s_per_pass", "train time per pass"), ("process_s", "process")):
            metric = metrics[key]
            lines.append(
                f"{label:<26}{metric['ppo']['median']:>10.2f} s{metric['dpo']['median']:>10.2f} s"
                f"{metric['median_ratio']:>8.2f}"
            )
    generation = result.get("generation")
    if generation:
        settings = generation["settings"]
        lines += [
            "",
            f"Generation: batch {settings['batch_size']}, up to {settings['max_new_tokens']} new "
            "tokens, greedy",
            f"{'model':<26}{'KV cache':>12}{'no cache':>12}{'ratio':>8}",
        ]
        for name, measured in generation["models"].items():
            metric = measured["metrics"]["tokens_per_s"]
            label = f"{name}, {measured['prompts']} prompts"
            lines.append(
                f"{label:<26}{metric['cache']['median']:>12.0f}"
                f"{metric['no_cache']['median']:>12.0f}{metric['median_ratio']:>8.2f}"
            )
    return lines


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """The README's tables for the RLHF comparisons in a result."""
    lines: list[str] = []
    versus = result.get("ppo_vs_dpo")
    if versus:
        data, metrics = versus["data"], versus["metrics"]
        pairs = len(metrics["process_s"]["ratios"])
        lines += [
            "",
            f"| one pass over {data['train_pairs']} pairs / {data['train_prompts']} prompts, "
            f"{pairs} pairs | PPO | DPO | ratio |",
            "|---|---|---|---|",
        ]
        for key, label in (("train_s_per_pass", "training time"), ("process_s", "whole process")):
            metric = metrics[key]
            lines.append(
                f"| {label} | {metric['ppo']['median']:.2f} s | {metric['dpo']['median']:.2f} s "
                f"| {metric['median_ratio']:.2f} |"
            )
    generation = result.get("generation")
    if generation:
        lines += ["", "| generated tokens/s | KV cache | no cache | ratio |", "|---|---|---|---|"]
        for name, measured in generation["models"].items():
            metric = measured["metrics"]["tokens_per_s"]
            params = measured["parameters"] / 1e6
            lines.append(
                f"| {name} model ({params:.1f}M parameters, {measured['prompts']} prompts) | "
                f"{metric['cache']['median']:.0f} | "
                f"{metric['no_cache']['median']:.0f} | {metric['median_ratio']:.2f} |"
            )
    return lines
