"""The benchmarks behind ``make bench``: alignpipe against what a user would run instead.

Two DPO comparisons here, each in whole fresh processes, alternating sides so that both meet the
same noise on a shared machine (and two RLHF ones in :mod:`bench.rlhf`: a PPO pass against a
DPO pass, and generation with and without the KV cache):

- overhead: alignpipe's DPO stage against TRL's ``DPOTrainer`` called directly with the same
  data, tiny model, LoRA settings, steps, batch, sequence length, learning rate, seed, threads
  and dtype; wall time of the whole process, of the stage (imports excluded) and of ``train()``.
- memory: DPO through alignpipe with a LoRA adapter (reference = adapter switched off) against
  full fine-tuning (TRL loads a reference copy), on a randomly initialised ~114M-parameter Llama
  so that the weights dominate; peak RSS of the whole process from ``/usr/bin/time -v``.

Counts come from the command line or ``BENCH_*`` environment variables (see ``--help``). The
results go to ``OUTPUT/bench-<date>.json``; ``--markdown FILE`` prints the README tables from
one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import REPO, rlhf, worker_env
from bench.stats import OVERHEAD_MEASURES, markdown_table, parse_time_v, summarize_pairs

log = logging.getLogger("bench.dpo")

GNU_TIME = "/usr/bin/time"

# The pairs: the synthetic task's simulated votes reduced to preference pairs by the ingest stage.
TASK = {"seed": 0, "num_sft": 200, "num_prompts": 8, "num_pairs": 400}

# Settings both sides of the overhead comparison share, on the tiny model.
OVERHEAD_SETTINGS: dict[str, Any] = {
    "steps": 100,
    "batch_size": 8,
    "max_length": 128,
    "learning_rate": 5e-4,
    "beta": 0.1,
    "loss_type": "sigmoid",
    "seed": 0,
    "logging_steps": 10,
    # above max_steps, so each side writes the one checkpoint transformers saves at the end
    "save_steps": 500,
    "peft": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}

# Memory, not speed: few steps on short sequences, a handful of pairs so evaluation is quick.
MEMORY_SETTINGS: dict[str, Any] = {
    **OVERHEAD_SETTINGS,
    "steps": 3,
    "batch_size": 2,
    "max_length": 64,
    "learning_rate": 1e-5,
    "logging_steps": 1,
}
MEMORY_PAIRS = {"train": 8, "eval": 4}
# Llama shape of about 114M parameters (BERT-base width and depth) with the tiny tokenizer's
# vocabulary, so that nearly every byte of the model is transformer weights.
MEMORY_MODEL = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "seed": 0,
}

OVERHEAD_WHAT = (
    "Wall time of one DPO run on the tiny model, each side in its own fresh Python process. "
    "process_s: from spawning the process to its exit, measured by the parent (interpreter "
    "start, imports, data, model, evaluation, training, saving). stage_s: inside the process, "
    "after torch/transformers/trl/peft/datasets are imported: alignpipe = DpoStageConfig + "
    "dpo.run(); TRL = reading the same parquet pairs, loading tokenizer and model, DPOConfig + "
    "DPOTrainer(ref_model=None, peft_config=LoraConfig), evaluate(), train(), evaluate(), "
    "save_model(). train_s: trainer.train() alone (alignpipe's own train_seconds metric). "
    "Ratios are alignpipe / TRL; above 1 means alignpipe is slower."
)
MEMORY_WHAT = (
    "Peak resident set size of the whole process (GNU time -v, 'Maximum resident set size') "
    "for one DPO stage run through alignpipe, one configuration per process: lora = LoRA "
    "adapter, the reference is the same model with the adapter off; full = peft.method=none, "
    "TRL loads a second copy of the model as the reference. Ratio is lora / full."
)


@dataclass
class Fixtures:
    """What both sides start from: the pairs and the models, built once per benchmark run."""

    pairs: Path
    small_pairs: Path
    tiny_model: Path
    memory_model: Path
    counts: dict[str, int]
    tiny_parameters: int
    memory_parameters: int


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or print the README table of a finished one)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.markdown:
        result = json.loads(Path(args.markdown).read_text(encoding="utf-8"))
        print(markdown_table(result), end="")
        print("\n".join(rlhf.markdown_lines(result)))
        return 0
    if args.pairs < 1 or args.memory_runs < 0 or args.warmup < 0:
        raise SystemExit("--pairs must be at least 1; --warmup and --memory-runs at least 0")

    started = time.perf_counter()
    out = Path(args.output).resolve()
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict[str, Any] = {
        "benchmark": "alignpipe",
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "device": "cpu",
    }

    # DPO: fixtures (pairs, the tiny model, the ~100M model), then the two comparisons
    overhead = args.only in ("all", "overhead")
    memory = args.only in ("all", "memory") and args.memory_runs > 0
    if overhead or memory:
        fixtures = prepare_fixtures(work / "dpo", with_memory_model=memory)
        result["data"] = {"task": TASK, **fixtures.counts}
    if overhead:
        result["overhead"] = run_overhead(fixtures, work / "dpo", args)
    if memory:
        result["memory"] = run_memory(fixtures, work / "dpo", args)

    # RLHF: a PPO pass against a DPO pass; generation with and without the KV cache
    if args.only in ("all", "ppo", "generation"):
        result |= rlhf.run(work / "rlhf", args, args.only)
    result["wall_s"] = time.perf_counter() - started
    result["machine"]["loadavg_end"] = _loadavg()

    path = out / f"bench-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.keep_work:
        shutil.rmtree(work)
    print(text_report(result))
    print(f"\nWritten: {path}")
    print(f"README table: {sys.executable} -m bench --markdown {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=int(env("BENCH_PAIRS", "5")),
        help="counted A/B pairs of the overhead comparison (BENCH_PAIRS, default 5)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=int(env("BENCH_WARMUP", "1")),
        help="uncounted A/B pairs run first (BENCH_WARMUP, default 1)",
    )
    parser.add_argument(
        "--memory-runs",
        type=int,
        default=int(env("BENCH_MEMORY_RUNS", "3")),
        help="LoRA/full pairs of the memory comparison (BENCH_MEMORY_RUNS, default 3; 0 skips)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=int(env("BENCH_STEPS", str(OVERHEAD_SETTINGS["steps"]))),
        help="optimizer steps per overhead run (BENCH_STEPS, default 100)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env("BENCH_THREADS", "1")),
        help="torch threads in every run (BENCH_THREADS, default 1: the tiny model is too\n"
        "narrow to gain from more, and on a shared machine a second thread waits on a busy core)",
    )
    parser.add_argument(
        "--only",
        choices=("all", "overhead", "memory", "ppo", "generation"),
        default=env("BENCH_ONLY", "all"),
        help="run one comparison only (BENCH_ONLY)",
    )
    parser.add_argument("--output", default="bench-output", help="folder for the JSON results")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the fixtures and each run's log"
    )
    parser.add_argument(
        "--markdown", metavar="JSON", help="print the README table of a result file and exit"
    )
    return parser


# ---------------------------------------------------------------------------------------------
# fixtures


def prepare_fixtures(work: Path, with_memory_model: bool) -> Fixtures:
    """Write the pairs and the models every run of this benchmark starts from."""
    from alignpipe import ingest, models, synthetic
    from alignpipe.config import load_config

    # the task and a tiny model whose tokenizer is trained on its text
    options = synthetic.SyntheticTaskOptions(**TASK)
    paths = synthetic.write_task(options, work / "task")
    tiny = work / "tiny-model"
    tiny_model, tokenizer = models.build_tiny_model(
        synthetic.corpus(options), models.TinyModelOptions(), str(tiny)
    )

    # pairs from the simulated votes, checked against the tokenizer's chat template
    pairs = work / "pairs"
    config = load_config(ingest.IngestConfig, None, {"tokenizer": str(tiny)})
    ingest.run(config, [str(paths["votes"])], str(pairs))
    small = work / "pairs-small"
    counts = _subset(pairs, small, MEMORY_PAIRS)

    # the model of the memory comparison: random weights, saved once, loaded by each run
    big = work / "memory-model"
    big_parameters = 0
    if with_memory_model:
        big_model = models.build_tiny_causal_lm(models.TinyModelOptions(**MEMORY_MODEL), tokenizer)
        big_parameters = big_model.num_parameters()
        models.save_model(big_model, tokenizer, str(big))
        del big_model
    log.info("fixtures ready in %s: %s", work, counts)
    return Fixtures(
        pairs=pairs,
        small_pairs=small,
        tiny_model=tiny,
        memory_model=big,
        counts=counts,
        tiny_parameters=tiny_model.num_parameters(),
        memory_parameters=big_parameters,
    )


def _subset(source: Path, dest: Path, sizes: dict[str, int]) -> dict[str, int]:
    """Copy the first rows of each split; returns the row counts of source and subset."""
    import pyarrow.parquet as pq

    dest.mkdir(parents=True)
    counts = {}
    for split in ("train", "eval"):
        table = pq.read_table(source / f"{split}.parquet")
        if table.num_rows < sizes[split]:
            raise SystemExit(f"the ingest output has {table.num_rows} {split} pairs; need more")
        pq.write_table(table.slice(0, sizes[split]), dest / f"{split}.parquet")
        counts[f"{split}_pairs"] = table.num_rows
        counts[f"memory_{split}_pairs"] = sizes[split]
    return counts


# ---------------------------------------------------------------------------------------------
# the two comparisons


def run_overhead(fixtures: Fixtures, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate alignpipe and TRL runs; summarise each timing over the counted pairs."""
    settings = {**OVERHEAD_SETTINGS, "steps": args.steps, "threads": args.threads}
    settings_file = _write_settings(work / "overhead-settings.json", settings)
    runs = []
    total = args.warmup + args.pairs
    for index in range(total):
        row: dict[str, Any] = {"index": index, "warmup": index < args.warmup}
        for side in ("alignpipe", "trl"):
            row[side] = run_worker(
                side,
                fixtures.pairs,
                fixtures.tiny_model,
                settings_file,
                work / "runs" / f"overhead-{index}-{side}",
                args.threads,
            )
        log.info(
            "overhead %d/%d%s: alignpipe %.1f s, trl %.1f s",
            index + 1,
            total,
            " (warm-up)" if row["warmup"] else "",
            row["alignpipe"]["process_s"],
            row["trl"]["process_s"],
        )
        runs.append(row)

    counted = [r for r in runs if not r["warmup"]]
    metrics = {}
    for key, _ in OVERHEAD_MEASURES:
        a = [r["alignpipe"].get(key) for r in counted]
        b = [r["trl"].get(key) for r in counted]
        if None in a or None in b:
            log.warning("overhead: %s is missing from some runs; not summarised", key)
            continue
        metrics[key] = summarize_pairs(a, b, ("alignpipe", "trl"))
    return {
        "what": OVERHEAD_WHAT,
        "model": {
            "name": "tiny (alignpipe tiny-model defaults)",
            "parameters": fixtures.tiny_parameters,
        },
        "settings": settings,
        "runs": runs,
        "metrics": metrics,
    }


def run_memory(fixtures: Fixtures, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Alternate LoRA and full fine-tuning runs; summarise the peak RSS of each."""
    runs = []
    files = {}
    for config, peft in (("lora", "lora"), ("full", "none")):
        settings = {**MEMORY_SETTINGS, "peft": peft, "threads": args.threads}
        files[config] = _write_settings(work / f"memory-{config}-settings.json", settings)
    for index in range(args.memory_runs):
        row: dict[str, Any] = {"index": index}
        for config in ("lora", "full"):
            row[config] = run_worker(
                "alignpipe",
                fixtures.small_pairs,
                fixtures.memory_model,
                files[config],
                work / "runs" / f"memory-{index}-{config}",
                args.threads,
                measure_memory=True,
            )
        log.info(
            "memory %d/%d: lora %.0f MB, full %.0f MB",
            index + 1,
            args.memory_runs,
            row["lora"]["max_rss_mb"],
            row["full"]["max_rss_mb"],
        )
        runs.append(row)
    lora = [r["lora"]["max_rss_mb"] for r in runs]
    full = [r["full"]["max_rss_mb"] for r in runs]
    return {
        "what": MEMORY_WHAT,
        "model": {
            "name": "random Llama " + ", ".join(f"{k}={v}" for k, v in MEMORY_MODEL.items()),
            "parameters": fixtures.memory_parameters,
            "weights_mb": fixtures.memory_parameters * 4 / 2**20,
        },
        "settings": {k: v for k, v in MEMORY_SETTINGS.items() if k != "peft"},
        "runs": runs,
        "metrics": {"max_rss_mb": summarize_pairs(lora, full, ("lora", "full"))},
    }


def _write_settings(path: Path, settings: dict[str, Any]) -> Path:
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def run_worker(
    side: str,
    data: Path,
    model: Path,
    settings: Path,
    folder: Path,
    threads: int,
    measure_memory: bool = False,
) -> dict[str, Any]:
    """Run one side in a fresh process; return its timings (and peak RSS when asked).

    The parent times the process from spawn to exit. Peak RSS comes from GNU time's report when
    ``/usr/bin/time`` exists, and from the kernel's rusage of the child (the same number, read
    through ``wait4``) otherwise.
    """
    folder.mkdir(parents=True)
    output, result_file, log_file = folder / "output", folder / "result.json", folder / "run.log"
    command = [sys.executable, "-m", "bench.dpo_worker", side]
    command += ["--data", str(data), "--model", str(model), "--output", str(output)]
    command += ["--settings", str(settings), "--result", str(result_file)]
    time_report = folder / "time.txt"
    use_gnu_time = measure_memory and Path(GNU_TIME).is_file()
    if use_gnu_time:
        command = [GNU_TIME, "-v", "-o", str(time_report), *command]

    with log_file.open("w", encoding="utf-8") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(threads), cwd=REPO
        )
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{side} run failed (exit {process.returncode}); log {log_file}:\n{tail}")

    timings = json.loads(result_file.read_text(encoding="utf-8"))
    timings["process_s"] = elapsed
    if measure_memory:
        # ru_maxrss is in kilobytes on Linux
        wait4_kb = float(usage.ru_maxrss)
        if use_gnu_time:
            report = parse_time_v(time_report.read_text(encoding="utf-8"))
            timings["max_rss_mb"] = report["max_rss_kb"] / 1024
            timings["rss_source"] = "/usr/bin/time -v"
        else:
            timings["max_rss_mb"] = wait4_kb / 1024
            timings["rss_source"] = "wait4 rusage"
        timings["wait4_max_rss_mb"] = wait4_kb / 1024
    # checkpoints of the ~100M model run to gigabytes; only the timings are kept
    shutil.rmtree(output, ignore_errors=True)
    return timings


# ---------------------------------------------------------------------------------------------
# machine and report


def machine_info(threads: int) -> dict[str, Any]:
    """Cores, CPU model, memory and library versions of this machine."""
    versions = {}
    for package in ("alignpipe", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "memory_gb": float((_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]) / 2**20,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git": _git_revision(),
        "loadavg_start": _loadavg(),
    }


def _proc_field(path: str, name: str) -> str | None:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _git_revision() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def text_report(result: dict[str, Any]) -> str:
    """The side-by-side table printed at the end of a run."""
    machine = result["machine"]
    lines = [
        f"Benchmarks, {result['date']}: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['threads']} torch threads; torch {machine['versions']['torch']}, "
        f"trl {machine['versions']['trl']}, transformers {machine['versions']['transformers']}",
    ]
    overhead = result.get("overhead")
    if overhead:
        settings = overhead["settings"]
        counted = len(overhead["metrics"]["process_s"]["ratios"])
        lines += [
            "",
            f"Overhead: tiny model ({overhead['model']['parameters']:,} parameters), LoRA "
            f"r={settings['lora']['r']}, {settings['steps']} steps, batch {settings['batch_size']}"
            f", max_length {settings['max_length']}; {counted} counted pairs after "
            f"{len(overhead['runs']) - counted} warm-up",
            f"{'measure':<26}{'alignpipe':>12}{'TRL direct':>12}{'ratio':>8}",
        ]
        for key, label in OVERHEAD_MEASURES:
            metric = overhead["metrics"].get(key)
            if metric:
                lines.append(
                    f"{label:<26}{metric['alignpipe']['median']:>10.2f} s"
                    f"{metric['trl']['median']:>10.2f} s{metric['median_ratio']:>8.2f}"
                )
        lines.append("(medians; ratio = median of per-pair alignpipe/TRL ratios)")
    memory = result.get("memory")
    if memory:
        metric = memory["metrics"]["max_rss_mb"]
        lines += [
            "",
            f"Memory: {memory['model']['parameters'] / 1e6:.0f}M-parameter random Llama "
            f"({memory['model']['weights_mb']:.0f} MB of fp32 weights), "
            f"{memory['settings']['steps']} steps, batch {memory['settings']['batch_size']}; "
            f"{len(metric['ratios'])} pairs",
            f"{'measure':<26}{'LoRA ref':>12}{'full copy':>12}{'ratio':>8}",
            f"{'peak RSS':<26}{metric['lora']['median']:>9.0f} MB{metric['full']['median']:>9.0f}"
            f" MB{metric['median_ratio']:>8.2f}",
            "(medians; ratio = median of per-pair LoRA/full ratios)",
        ]
    lines += rlhf.text_report(result)
    lines.append(f"\nTotal wall time {result['wall_s'] / 60:.1f} min")
    return "\n".join(lines)
