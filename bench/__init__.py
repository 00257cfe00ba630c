"""Benchmarks of alignpipe against what a user would do instead, run by ``make bench``.

They measure and report; they never pass or fail. The method is in the project's benchmark notes:
paired runs in one session, whole processes for memory, the same work on both sides.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_env(threads: int) -> dict[str, str]:
    """The environment of every measured process: CPU only, fixed threads, offline, untracked."""
    env = dict(os.environ)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
