"""What the tests of the stages on the synthetic task's preferences build the same way.

The task's data as the data stages write it (DPO, the reward model, PPO, few-shot evaluation,
prompt tuning), a tiny model SFT-trained on it, and a stage run in a child process that is
killed as soon as its first checkpoint is complete. Each test module keeps its own recipe (how
many pairs, how many SFT steps), so these take it as arguments.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from alignpipe import ingest, models, prep, sft, synthetic
from alignpipe.config import load_config

CHECKPOINT_TIMEOUT_S = 180.0


def write_task(
    root: Path,
    num_pairs: int,
    *,
    num_sft: int = 3000,
    num_prompts: int = 8,
    eval_fraction: float = 0.1,
) -> Path:
    """The synthetic task under ``root``: its files in ``task``, ``prefs`` and ``sft-data``.

    ``prefs`` is the ingest stage's output for ``num_pairs`` voted pairs (``eval_fraction`` of
    the prompts held out), ``sft-data`` the prep stage's output for ``num_sft`` conversations.
    """
    options = synthetic.SyntheticTaskOptions(
        num_sft=num_sft, num_pairs=num_pairs, num_prompts=num_prompts
    )
    files = synthetic.write_task(options, root / "task")
    ingest_config = ingest.IngestConfig(eval_fraction=eval_fraction)
    ingest.run(ingest_config, [str(files["votes"])], str(root / "prefs"))
    prep.run(prep.PrepConfig(), [str(files["sft"])], str(root / "sft-data"))
    return root


def sft_tiny_model(task: Path, max_steps: int, overrides: Sequence[str] = ()) -> str:
    """A tiny model built for ``task`` and SFT-trained by the sft stage; its output folder.

    The vocabulary is large enough (1024 asked, under 600 used) for every item of the task to
    be one token, so that a preference between items is a preference between tokens. Full
    fine-tuning at a constant 3e-3, batches of 32 conversations of at most 64 tokens.
    """
    texts = synthetic.corpus(synthetic.SyntheticTaskOptions(num_sft=200, num_pairs=50))
    models.build_tiny_model(texts, models.TinyModelOptions(vocab_size=1024), str(task / "tiny"))
    config = load_config(
        sft.SftStageConfig,
        None,
        [
            f"model={task / 'tiny'}",
            "peft.method=none",
            "max_length=64",
            f"training.max_steps={max_steps}",
            "training.learning_rate=3e-3",
            "training.lr_scheduler=constant",
            "training.batch_size=32",
            *overrides,
        ],
    )
    sft.run(config, str(task / "sft-data"), str(task / "sft"))
    return str(task / "sft")


def kill_at_first_checkpoint(
    stage: str,
    config_class: str,
    data: Path,
    out: Path,
    overrides: Sequence[str],
    find: Callable[[Path], str | None],
) -> str:
    """Run ``alignpipe.<stage>.run`` in a child process; SIGKILL it once ``find(out)`` sees a
    complete checkpoint, and return that checkpoint.

    Fails the test when the run ends, or finds no checkpoint, within three minutes.
    """
    script = (
        "import sys\n"
        f"from alignpipe import {stage}\n"
        "from alignpipe.config import load_config\n"
        f"config = load_config({stage}.{config_class}, None, sys.argv[3:])\n"
        f"{stage}.run(config, sys.argv[1], sys.argv[2])\n"
    )
    command = [sys.executable, "-c", script, str(data), str(out), *overrides]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + CHECKPOINT_TIMEOUT_S
        while find(out) is None:
            if process.poll() is not None:
                pytest.fail(f"the run ended before its first checkpoint: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint within {CHECKPOINT_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    checkpoint = find(out)
    assert checkpoint is not None
    assert not (out / "model").exists()  # killed mid-run: nothing saved yet
    return checkpoint
