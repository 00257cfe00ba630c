"""Generation with and without the KV cache, alternating, in one fresh process.

``python -m bench.generation_worker --model DIR --data DIR --settings JSON --result FILE``
answers the first distinct training prompts of a pairs folder with
:func:`alignpipe.evaluate.generate_responses`, greedy, once with ``use_cache=True`` and once
without, ``--rounds`` times, and writes each round's tokens/s as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class _Greedy:
    """The sampling fields generate_responses reads."""

    max_new_tokens: int
    batch_size: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generation_worker", description=__doc__)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="pairs folder whose prompts are answered")
    parser.add_argument(
        "--settings", required=True, help="JSON: prompts, batch_size, max_new_tokens"
    )
    parser.add_argument("--result", required=True, help="where to write the timings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    settings = json.loads(args.settings)

    import torch

    from alignpipe import evaluate, models, ppo

    torch.set_num_threads(args.threads)
    model = models.load_causal_lm(args.model, dtype="float32")
    model.eval()
    tokenizer = models.load_tokenizer(args.model)
    prompts = ppo.load_prompts(args.data, "train")[: settings["prompts"]]
    greedy = _Greedy(settings["max_new_tokens"], settings["batch_size"])

    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        row: dict[str, Any] = {"index": index, "warmup": index < args.warmup}
        answers = {}
        for side, use_cache in (("cache", True), ("no_cache", False)):
            started = time.perf_counter()
            generation = evaluate.generate_responses(
                model, tokenizer, prompts, greedy, use_cache=use_cache
            )
            seconds = time.perf_counter() - started
            tokens = sum(len(ids) for ids in generation.response_ids)
            row[side] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
            answers[side] = generation.response_ids
        # greedy decoding from the same weights: both sides should produce the same tokens
        row["same_tokens"] = answers["cache"] == answers["no_cache"]
        rounds.append(row)

    result = {"parameters": model.num_parameters(), "prompts": len(prompts), "rounds": rounds}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
