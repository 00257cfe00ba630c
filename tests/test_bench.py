"""The benchmark harness's arithmetic and parsing, on hand numbers and a real GNU time report."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.stats import (
    markdown_table,
    median,
    paired_ratios,
    parse_clock,
    parse_time_v,
    summarize_pairs,
)

# What `/usr/bin/time -v -o FILE python3 -c "x=bytearray(50_000_000)"` wrote on the dev machine.
TIME_V_REPORT = """\
\tCommand being timed: "python3 -c x=bytearray(50_000_000)"
\tUser time (seconds): 0.08
\tSystem time (seconds): 0.03
\tPercent of CPU this job got: 89%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:00.12
\tAverage shared text size (kbytes): 0
\tAverage unshared data size (kbytes): 0
\tAverage stack size (kbytes): 0
\tAverage total size (kbytes): 0
\tMaximum resident set size (kbytes): 62300
\tAverage resident set size (kbytes): 0
\tMajor (requiring I/O) page faults: 1
\tMinor (reclaiming a frame) page faults: 21561
\tVoluntary context switches: 119
\tInvoluntary context switches: 53
\tSwaps: 0
\tFile system inputs: 72
\tFile system outputs: 0
\tSocket messages sent: 0
\tSocket messages received: 0
\tSignals delivered: 0
\tPage size (bytes): 4096
\tExit status: 0
"""


def test_median_of_ratios_is_not_ratio_of_medians():
    # per pair: 10/5=2, 12/6=2, 9/9=1, 11/10=1.1, 30/10=3 -> sorted 1, 1.1, 2, 2, 3 -> median 2
    summary = summarize_pairs([10, 12, 9, 11, 30], [5, 6, 9, 10, 10], ("alignpipe", "trl"))
    assert summary["ratios"] == pytest.approx([2.0, 2.0, 1.0, 1.1, 3.0])
    assert summary["median_ratio"] == pytest.approx(2.0)
    assert summary["alignpipe"] == {"values": [10, 12, 9, 11, 30], "median": 11.0}
    assert summary["trl"]["median"] == 9.0
    # the ratio of the medians would have said 11 / 9 = 1.22
    assert summary["alignpipe"]["median"] / summary["trl"]["median"] == pytest.approx(1.2222, 1e-3)


def test_median_of_an_even_count_averages_the_middle_two():
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert summarize_pairs([1, 3], [2, 2])["median_ratio"] == pytest.approx(1.0)


def test_paired_ratios_refuse_unpaired_or_zero_values():
    assert paired_ratios([3, 1], [2, 4]) == [1.5, 0.25]
    with pytest.raises(ValueError, match="as many values"):
        paired_ratios([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        paired_ratios([1], [0])
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_parse_time_v_reads_a_real_report():
    parsed = parse_time_v(TIME_V_REPORT)
    assert parsed == {
        "user_s": 0.08,
        "system_s": 0.03,
        "elapsed_s": pytest.approx(0.12),
        "max_rss_kb": 62300.0,
        "exit_status": 0.0,
    }


def test_parse_time_v_of_a_long_failed_command():
    report = (
        "Command exited with non-zero status 3\n"
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03\n"
        "\tMaximum resident set size (kbytes): 2858684\n"
    )
    parsed = parse_time_v(report)
    assert parsed["elapsed_s"] == 3723.0
    assert parsed["max_rss_kb"] == 2858684.0
    assert parsed["exit_status"] == 3.0


def test_parse_time_v_without_rss_line_fails():
    with pytest.raises(ValueError, match="Maximum resident set size"):
        parse_time_v("real 0m1.0s\nuser 0m0.5s\n")


def test_parse_clock_forms():
    assert parse_clock("0:18.35") == pytest.approx(18.35)
    assert parse_clock("2:05.5") == pytest.approx(125.5)
    assert parse_clock("1:00:01") == 3601.0
    with pytest.raises(ValueError, match="clock"):
        parse_clock("18.35")
    with pytest.raises(ValueError, match="clock"):
        parse_clock("a:bc")


def test_markdown_table_rows_come_from_the_result():
    machine = {
        "cpu_model": "Test CPU",
        "cores": 2,
        "threads": 1,
        "memory_gb": 23.4,
        "versions": {"torch": "2.13.0", "transformers": "5.24", "trl": "1.16.0", "peft": "0.21"},
    }
    pair = {"median_ratio": 1.25, "ratios": [1.2, 1.25, 1.3]}
    result = {
        "date": "2026-12-03",
        "machine": machine,
        "overhead": {
            "metrics": {
                "process_s": {**pair, "alignpipe": {"median": 20.0}, "trl": {"median": 16.0}},
                "train_s": {**pair, "alignpipe": {"median": 9.0}, "trl": {"median": 9.5}},
            }
        },
        "memory": {
            "model": {"parameters": 113_658_624},
            "metrics": {
                "max_rss_mb": {
                    "lora": {"median": 1200.0},
                    "full": {"median": 2800.0},
                    "ratios": [0.43, 0.42, 0.44],
                    "median_ratio": 0.43,
                }
            },
        },
    }
    lines = markdown_table(result).splitlines()
    assert lines[0].startswith("Measured 2026-12-03 on Test CPU, 2 cores, 23 GB RAM, 1 torch")
    assert lines[2:] == [
        "| DPO, tiny model, 3 pairs | alignpipe stage | TRL `DPOTrainer` direct | ratio |",
        "|---|---|---|---|",
        "| whole process | 20.00 s | 16.00 s | 1.25 |",
        "| train() only | 9.00 s | 9.50 s | 1.25 |",
        "",
        "| DPO reference, 114M-parameter model, 3 pairs | LoRA adapter off | full copy | ratio |",
        "|---|---|---|---|",
        "| peak RSS | 1200 MB | 2800 MB | 0.43 |",
    ]


def test_worker_settings_are_valid_dpo_stage_options():
    from alignpipe import dpo
    from alignpipe.config import load_config
    from bench.dpo import MEMORY_SETTINGS, OVERHEAD_SETTINGS
    from bench.dpo_worker import alignpipe_overrides

    settings = {**OVERHEAD_SETTINGS, "threads": 1}
    config = load_config(dpo.DpoStageConfig, None, alignpipe_overrides(settings, "/models/tiny"))
    assert config.model == "/models/tiny"
    assert (config.peft.method, config.peft.lora.r, config.peft.lora.alpha) == ("lora", 8, 16)
    assert config.peft.lora.target_modules == ["q_proj", "v_proj"]
    assert (config.training.max_steps, config.training.batch_size) == (100, 8)
    assert (config.max_length, config.dtype, config.training.num_threads) == (128, "float32", 1)
    assert config.training.gradient_checkpointing is False

    full = {**MEMORY_SETTINGS, "peft": "none", "threads": 2}
    config = load_config(dpo.DpoStageConfig, None, alignpipe_overrides(full, "/models/big"))
    assert config.peft.method == "none"
    assert (config.training.max_steps, config.training.batch_size, config.max_length) == (3, 2, 64)


def test_ppo_and_dpo_settings_are_one_pass_of_valid_stage_options():
    from alignpipe import dpo, ppo
    from alignpipe.config import load_config
    from bench.rlhf import Fixtures, stage_configs

    # 2180 pairs in batches of 64 -> 35 steps; 520 prompts in rollouts of 64 -> 9 iterations
    fixtures = Fixtures(
        Path("/pairs"),
        Path("/sft"),
        Path("/rm"),
        Path("/wide"),
        train_pairs=2180,
        train_prompts=520,
    )
    configs = stage_configs(fixtures, threads=1)
    dpo_config = load_config(dpo.DpoStageConfig, None, configs["dpo"])
    ppo_config = load_config(ppo.PpoStageConfig, None, configs["ppo"])
    assert (dpo_config.training.max_steps, dpo_config.training.batch_size) == (35, 64)
    assert (ppo_config.training.max_steps, ppo_config.rollout_batch_size) == (9, 64)
    assert dpo_config.model == ppo_config.model == "/sft"
    assert (ppo_config.reward, ppo_config.reward_model) == ("reward_model", "/rm")
    # nothing ends a pass early or interrupts it with a checkpoint
    assert ppo_config.max_kl_to_reference is None
    assert ppo_config.training.save_steps > 9 and dpo_config.training.save_steps > 35
    assert dpo_config.training.num_threads == ppo_config.training.num_threads == 1


def test_rlhf_tables_come_from_the_result():
    from bench.rlhf import markdown_lines, text_report

    def pair(a: str, b: str, x: float, y: float, ratio: float) -> dict:
        return {a: {"median": x}, b: {"median": y}, "ratios": [ratio] * 3, "median_ratio": ratio}

    result = {
        "ppo_vs_dpo": {
            "data": {"train_pairs": 2180, "train_prompts": 520},
            "metrics": {
                "train_s_per_pass": pair("ppo", "dpo", 4.0, 10.0, 0.4),
                "process_s": pair("ppo", "dpo", 12.0, 24.0, 0.5),
            },
        },
        "generation": {
            "settings": {"batch_size": 16, "max_new_tokens": 64},
            "models": {
                "wide random": {
                    "parameters": 4_348_672,
                    "prompts": 32,
                    "metrics": {"tokens_per_s": pair("cache", "no_cache", 560, 56, 10.0)},
                }
            },
        },
    }
    assert markdown_lines(result) == [
        "",
        "| one pass over 2180 pairs / 520 prompts, 3 pairs | PPO | DPO | ratio |",
        "|---|---|---|---|",
        "| training time | 4.00 s | 10.00 s | 0.40 |",
        "| whole process | 12.00 s | 24.00 s | 0.50 |",
        "",
        "| generated tokens/s | KV cache | no cache | ratio |",
        "|---|---|---|---|",
        "| wide random model (4.3M parameters, 32 prompts) | 560 | 56 | 10.00 |",
    ]
    text = "\n".join(text_report(result))
    assert "train time per pass             4.00 s     10.00 s    0.40" in text
    assert "wide random, 32 prompts            560          56   10.00" in text
