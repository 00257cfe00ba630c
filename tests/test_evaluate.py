"""The evaluation stage on tiny models: metric math, identities, determinism, gate and report."""

from __future__ import annotations

import base64
import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignpipe import evaluate, ingest, models, prep, synthetic
from alignpipe.config import load_config
from alignpipe.data.build import read_split
from alignpipe.errors import ConfigError, DataError
from alignpipe.evaluate import EvalStageConfig
from alignpipe.tracking import NullTracker

NUM_PROMPTS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic task's files, ingested to preference pairs and prepped to conversations."""
    root = tmp_path_factory.mktemp("eval-task")
    options = synthetic.SyntheticTaskOptions(num_sft=300, num_pairs=150, num_prompts=10)
    files = synthetic.write_task(options, root / "task")
    ingest.run(ingest.IngestConfig(eval_fraction=0.3), [str(files["votes"])], str(root / "pairs"))
    prep.run(prep.PrepConfig(eval_fraction=0.2), [str(files["sft"])], str(root / "sft"))
    return {"pairs": root / "pairs", "sft": root / "sft", "root": root}


@pytest.fixture(scope="module")
def sft_model(tiny_tokenizer_dir: Path, task: dict[str, Path]) -> Path:
    """The reference: the tiny model trained briefly on every demonstration (quality 0.5).

    It writes lists in the task's format with many wrong items, as an SFT model on noisy
    demonstrations does.
    """
    return _train(tiny_tokenizer_dir, _demonstrations(), task["root"] / "sft-model")


@pytest.fixture(scope="module")
def trained_policy(sft_model: Path, task: dict[str, Path]) -> Path:
    """The policy: the reference trained further on the perfect demonstrations only."""
    best = [r for r in _demonstrations() if synthetic.gold_reward(*_prompt_response(r)) == 1.0]
    return _train(sft_model, best, task["root"] / "policy")


def _demonstrations() -> list[dict]:
    return synthetic.generate_sft(synthetic.SyntheticTaskOptions(num_sft=2000, seed=1))


def _train(start: Path, records: list[dict], dest: Path, steps: int = 250) -> Path:
    """A few hundred steps of plain next-token training on whole conversations.

    A bare loop rather than a training stage: this file tests the evaluator, not SFT.
    """
    model = models.load_causal_lm(str(start))
    tokenizer = models.load_tokenizer(str(start))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    rng = random.Random(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        batch = tokenizer(
            rng.sample(texts, 32), add_special_tokens=False, padding=True, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    models.save_model(model.eval(), tokenizer, str(dest))
    return dest


@pytest.fixture(scope="module")
def policy_run(
    trained_policy: Path, sft_model: Path, task: dict[str, Path]
) -> tuple[evaluate.EvalResult, NullTracker]:
    """One evaluation of the trained policy against the untrained model, with a second scorer."""
    tracker = NullTracker()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(evaluate.SCORERS, "chars", lambda config: _CharScorer())
        config = EvalStageConfig(
            policy=str(trained_policy),
            reference=str(sft_model),
            sft_data=str(task["sft"]),
            scorers=["gold", "chars"],
            num_prompts=NUM_PROMPTS,
            batch_size=8,
        )
        result = evaluate.run(config, str(task["pairs"]), str(task["root"] / "eval"), tracker)
    return result, tracker


class _CharScorer:
    """A second scorer through the Protocol: the response's length in characters."""

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]


def _prompt_response(record: dict) -> tuple[str, str]:
    return record["messages"][0]["content"], record["messages"][1]["content"]


def _config(policy: Path, reference: Path, **kwargs) -> EvalStageConfig:
    kwargs.setdefault("num_prompts", NUM_PROMPTS)
    return EvalStageConfig(policy=str(policy), reference=str(reference), **kwargs)


# -- identities and determinism ------------------------------------------------------------------


def test_identical_models_give_zero_delta_half_win_rate_and_zero_kl(
    tiny_tokenizer_dir: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(tiny_tokenizer_dir, tiny_tokenizer_dir, sft_data=str(task["sft"]))
    result = evaluate.run(config, str(task["pairs"]), str(tmp_path))
    m = result.metrics

    # same weights, same seed: the same tokens on both sides, so every comparison is a tie
    assert m["gold_reward_delta"] == 0.0
    assert m["gold_reward_policy"] == m["gold_reward_reference"]
    assert m["gold_win_rate"] == 0.5
    # log p_policy - log p_ref of identical forward passes is 0 token by token
    assert m["kl_policy_reference"] == 0.0
    assert m["response_tokens_policy_mean"] == m["response_tokens_reference_mean"]
    assert m["perplexity_policy"] == m["perplexity_reference"]
    # every implicit reward is 0, and a tie is not a correct preference
    assert m["preference_accuracy"] == 0.0
    # delta 0 >= min_improvement 0 and no KL limit: the gate passes
    assert result.passed is True and m["passed"] == 1.0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").open()]
    assert all(s["policy"] == s["reference"] for s in samples)


@pytest.mark.slow  # trains the reference and the policy (about 10 s on 2 shared cores)
def test_trained_policy_beats_its_reference_on_gold_reward(
    policy_run: tuple[evaluate.EvalResult, NullTracker],
) -> None:
    # the reference imitated noisy demonstrations; the policy then saw only perfect ones
    m = policy_run[0].metrics
    assert m["gold_reward_reference"] < -0.3
    assert m["gold_reward_policy"] > 0.3
    assert m["gold_reward_delta"] > 0.6
    assert m["gold_win_rate"] > 0.7
    # it moved away from the reference to get there
    assert m["kl_policy_reference"] > 1.0
    # its implicit reward now agrees with the annotators more often than not
    assert m["preference_accuracy"] > 0.5
    assert policy_run[0].passed is True


def test_same_config_gives_same_metrics_when_sampling(
    trained_policy: Path, sft_model: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(trained_policy, sft_model, do_sample=True, seed=3)
    first = evaluate.run(config, str(task["pairs"]), str(tmp_path / "a"))
    second = evaluate.run(config, str(task["pairs"]), str(tmp_path / "b"))

    assert first.metrics == second.metrics
    assert (tmp_path / "a" / "samples.jsonl").read_bytes() == (
        tmp_path / "b" / "samples.jsonl"
    ).read_bytes()
    # another seed samples other responses: the seed, not luck, made the runs equal
    third = evaluate.run(
        _config(trained_policy, sft_model, do_sample=True, seed=4),
        str(task["pairs"]),
        str(tmp_path / "c"),
    )
    texts = [
        [json.loads(line)["policy"] for line in (tmp_path / run / "samples.jsonl").open()]
        for run in ("a", "c")
    ]
    assert texts[0] != texts[1]
    assert third.metrics["kl_policy_reference"] != first.metrics["kl_policy_reference"]


# -- the metrics ---------------------------------------------------------------------------------


def test_metrics_are_complete_finite_and_match_the_samples(
    policy_run: tuple[evaluate.EvalResult, NullTracker], task: dict[str, Path]
) -> None:
    result, _ = policy_run
    m = result.metrics
    expected = set(evaluate.metric_names(["gold", "chars"], with_perplexity=True)) | {"passed"}
    assert set(m) == expected
    assert all(math.isfinite(v) for v in m.values())

    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").open()]
    # the first NUM_PROMPTS distinct prompts of the eval pairs, in file order
    prompts = []
    for pair in read_split(str(task["pairs"]), "eval"):
        if pair["prompt"] not in prompts:
            prompts.append(pair["prompt"])
    assert [s["prompt"] for s in samples] == prompts[:NUM_PROMPTS]
    # rescoring the saved responses gives back the saved scores and the means
    gold = [synthetic.gold_reward(s["prompt"], s["policy"]) for s in samples]
    assert gold == [s["scores"]["gold"]["policy"] for s in samples]
    assert m["gold_reward_policy"] == pytest.approx(sum(gold) / NUM_PROMPTS)
    chars = [len(s["reference"]) for s in samples]
    assert m["chars_reward_reference"] == pytest.approx(sum(chars) / NUM_PROMPTS)
    wins = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in (
            (s["scores"]["gold"]["policy"], s["scores"]["gold"]["reference"]) for s in samples
        )
    ]
    assert m["gold_win_rate"] == pytest.approx(sum(wins) / NUM_PROMPTS)
    tokens = [s["policy_tokens"] for s in samples]
    assert m["response_tokens_policy_mean"] == pytest.approx(sum(tokens) / NUM_PROMPTS)
    assert m["kl_policy_reference"] == pytest.approx(
        sum(s["policy_log_ratio"] for s in samples) / NUM_PROMPTS
    )
    assert json.loads((result.output_dir / "metrics.json").read_text()) == m


def test_implicit_rewards_and_preference_accuracy_match_a_hand_computation(
    policy_run: tuple[evaluate.EvalResult, NullTracker],
    trained_policy: Path,
    sft_model: Path,
    task: dict[str, Path],
) -> None:
    tokenizer = models.load_tokenizer(str(sft_model))
    policy = models.load_causal_lm(str(trained_policy))
    reference = models.load_causal_lm(str(sft_model))
    pairs = read_split(str(task["pairs"]), "eval")

    def logp(model, prompt: list, response: list) -> float:
        # one unpadded sequence at a time: sum log p over the tokens after the prompt
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full_text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        return sum(logprobs[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))

    def reward(pair: dict, side: str) -> float:
        return logp(policy, pair["prompt"], pair[side]) - logp(
            reference, pair["prompt"], pair[side]
        )

    # three pairs through the batched helper against the hand-made one
    chosen, rejected = evaluate.pair_rewards(policy, reference, tokenizer, pairs[:3], 2)
    assert chosen == pytest.approx([reward(p, "chosen") for p in pairs[:3]], abs=1e-3)
    assert rejected == pytest.approx([reward(p, "rejected") for p in pairs[:3]], abs=1e-3)
    # and the stage's metric over every held-out pair
    by_hand = [reward(p, "chosen") > reward(p, "rejected") for p in pairs]
    assert policy_run[0].metrics["preference_accuracy"] == pytest.approx(sum(by_hand) / len(pairs))
    assert 0 < sum(by_hand) < len(pairs)  # the check could have told one case from another


def test_preference_accuracy_counts_strict_wins_only() -> None:
    rewards = evaluate.implicit_rewards([-3.0, -2.0, -5.0], [-4.0, -1.0, -5.5])
    assert rewards == [1.0, -1.0, 0.5]
    assert evaluate.preference_accuracy([1.0, -1.0, 0.5], [0.5, 0.0, 0.5]) == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="no preference pairs"):
        evaluate.preference_accuracy([], [])


# -- gate ----------------------------------------------------------------------------------------


def test_gate_compares_the_metric_and_the_kl_limit() -> None:
    metrics = {"gold_reward_delta": 0.1, "kl_policy_reference": 2.0, "gold_win_rate": 0.6}
    assert evaluate.gate(metrics, "gold_reward_delta", 0.05)[0] is True
    assert evaluate.gate(metrics, "gold_reward_delta", 0.1)[0] is True  # equal passes
    assert evaluate.gate(metrics, "gold_reward_delta", 0.2)[0] is False
    assert evaluate.gate(metrics, "gold_win_rate", 0.5, max_kl=2.0)[0] is True  # equal passes
    passed, reasons = evaluate.gate(metrics, "gold_reward_delta", 0.0, max_kl=1.5)
    assert passed is False
    assert reasons == [
        "gold_reward_delta = 0.1 >= min_improvement 0",
        "kl_policy_reference = 2 > max_kl 1.5",
    ]
    assert evaluate.gate({"gold_reward_delta": math.nan}, "gold_reward_delta", -1.0)[0] is False
    with pytest.raises(ConfigError, match="available: gold_reward_delta, gold_win_rate, kl_"):
        evaluate.gate(metrics, "gold_reward", 0.0)


def test_failed_gate_is_reported_and_tagged(
    trained_policy: Path, sft_model: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    # the policy drifted far from the random reference: a KL limit of 0.5 nats stops it
    config = _config(trained_policy, sft_model, max_kl=0.5, num_prompts=4)
    tracker = NullTracker()
    result = evaluate.run(config, str(task["pairs"]), str(tmp_path), tracker)

    assert result.metrics["kl_policy_reference"] > 0.5
    assert result.passed is False and result.metrics["passed"] == 0.0
    assert tracker.tags[evaluate.GATE_TAG] == "failed"
    report = result.report.read_text()
    assert "## Gate: FAILED" in report
    assert "> max_kl 0.5" in report


# -- outputs and tracking ------------------------------------------------------------------------


def test_report_has_the_table_the_embedded_plot_and_an_html_twin(
    policy_run: tuple[evaluate.EvalResult, NullTracker],
) -> None:
    result, _ = policy_run
    out = result.output_dir
    report = result.report.read_text()
    assert result.report == out / "report.md"
    m = result.metrics
    assert "| metric | policy | reference | policy − reference |" in report
    row = (
        f"| gold reward (mean) | {m['gold_reward_policy']:.4g} | "
        f"{m['gold_reward_reference']:.4g} | {m['gold_reward_delta']:.4g} |"
    )
    assert row in report
    assert "## Gate: PASSED" in report
    # the plot is embedded as the very bytes of reward_hist.png
    start = report.index("data:image/png;base64,") + len("data:image/png;base64,")
    embedded = base64.b64decode(report[start : report.index(")", start)])
    png = (out / "reward_hist.png").read_bytes()
    assert embedded == png and png.startswith(b"\x89PNG\r\n\x1a\n")
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<th>policy − reference</th>" in page and 'src="data:image/png;base64,' in page
    assert "<h2>Gate: PASSED</h2>" in page


def test_tracker_gets_params_metrics_and_artifacts(
    policy_run: tuple[evaluate.EvalResult, NullTracker], trained_policy: Path
) -> None:
    result, tracker = policy_run
    assert tracker.params["policy"] == str(trained_policy)
    assert tracker.params["scorers"] == "['gold', 'chars']"
    logged = {k: v for k, v, _ in tracker.metrics}
    assert logged == result.metrics
    assert tracker.dicts["metrics.json"] == result.metrics
    assert sorted(Path(p).name for p, _ in tracker.artifacts) == [
        "report.html",
        "report.md",
        "reward_hist.png",
        "samples.jsonl",
    ]
    assert tracker.tags[evaluate.GATE_TAG] == "passed"
    assert [(d["name"], d["context"]) for d in tracker.datasets] == [
        ("preference-eval", "eval"),
        ("conversation-eval", "eval"),
    ]


# -- config and input errors ---------------------------------------------------------------------


def test_config_loads_with_overrides_and_validates() -> None:
    config = load_config(
        EvalStageConfig,
        overrides=["policy=/m/dpo", "reference=/m/sft", "max_kl=0.5", "do_sample=true"],
    )
    assert (config.policy, config.max_kl, config.scorers) == ("/m/dpo", 0.5, ["gold"])
    with pytest.raises(ConfigError, match="unknown scorer 'rm'; known scorers: gold"):
        EvalStageConfig(policy="a", reference="b", scorers=["rm"])
    with pytest.raises(ConfigError, match="unknown gate_metric 'perplexity_policy'; available: "):
        EvalStageConfig(policy="a", reference="b", gate_metric="perplexity_policy")
    # with SFT data perplexity becomes a metric the gate may use
    EvalStageConfig(policy="a", reference="b", sft_data="/d", gate_metric="perplexity_policy")
    with pytest.raises(ConfigError, match="set do_sample=true"):
        EvalStageConfig(policy="a", reference="b", temperature=0.7)
    with pytest.raises(ConfigError, match="policy must name a model"):
        load_config(EvalStageConfig, overrides=["policy=", "reference=b"])
    with pytest.raises(ConfigError, match="samples_per_prompt > 1 needs do_sample=true"):
        EvalStageConfig(policy="a", reference="b", samples_per_prompt=4)


def test_several_samples_per_prompt_answer_each_prompt_that_often(
    trained_policy: Path, sft_model: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(trained_policy, sft_model, do_sample=True, samples_per_prompt=3)
    evaluate.run(config, str(task["pairs"]), str(tmp_path / "out"))
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    prompts = [json.dumps(s["prompt"]) for s in samples]
    distinct = list(dict.fromkeys(prompts))
    assert len(samples) == 3 * len(distinct)
    assert all(prompts.count(p) == 3 for p in distinct)
    # sampled answers to one prompt differ somewhere: they are draws, not copies
    assert len({s["policy"] for s in samples}) > len(distinct)


def test_conversation_folder_as_preference_data_is_refused(
    tiny_tokenizer_dir: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(tiny_tokenizer_dir, tiny_tokenizer_dir)
    with pytest.raises(DataError, match="holds no prompt column; pass an ingest output folder"):
        evaluate.run(config, str(task["sft"]), str(tmp_path))


def test_models_with_different_tokenizers_are_refused(
    tiny_tokenizer_dir: Path, task: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    models.build_tiny_model(
        ["a completely different corpus"], models.TinyModelOptions(vocab_size=300), str(other)
    )
    config = _config(tiny_tokenizer_dir, other)
    with pytest.raises(ConfigError, match="policy and reference tokenizers differ"):
        evaluate.run(config, str(task["pairs"]), str(tmp_path / "out"))
