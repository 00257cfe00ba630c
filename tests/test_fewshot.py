"""The evaluation stage's few-shot baseline: the base model prompted with training examples.

The report then puts three answers side by side: the base model on the plain prompt, the same
model with k SFT conversations in front of the prompt, and the fine-tuned policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import preference_stages
import pytest

from alignpipe import evaluate, sft
from alignpipe.config import load_config
from alignpipe.errors import ConfigError, DataError

K = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return preference_stages.write_task(
        tmp_path_factory.mktemp("few-shot"),
        num_pairs=150,
        num_sft=400,
        num_prompts=10,
        eval_fraction=0.3,
    )


def fine_tune(start: str, data: Path, output: Path, steps: int) -> str:
    values = {
        "model": start,
        "peft": {"method": "none"},
        "max_length": 64,
        "training": {
            "max_steps": steps,
            "batch_size": 32,
            "learning_rate": 3e-3,
            "save_steps": 1000,
            "num_threads": 1,
        },
    }
    config = load_config(sft.SftStageConfig, None, values)
    return sft.run(config, str(data), str(output)).model_dir


@pytest.fixture(scope="module")
def tuned(tiny_tokenizer_dir: Path, task: Path) -> tuple[str, str]:
    """A base model that barely knows the task, and the same fine-tuned further.

    The base has had 10 steps of SFT: it writes text, not yet the task's lists, so examples
    in its prompt can change its answers. The policy is the base after 60 more steps.
    """
    base = fine_tune(str(tiny_tokenizer_dir), task / "sft-data", task / "base", steps=10)
    policy = fine_tune(base, task / "sft-data", task / "policy", steps=60)
    return base, policy


@pytest.fixture(scope="module")
def run(tuned: tuple[str, str], task: Path) -> evaluate.EvalResult:
    """The policy against the base, with a 2-shot baseline."""
    base, policy = tuned
    config = evaluate.EvalStageConfig(
        policy=policy,
        reference=base,
        # the same model under another name: loaded and answered on its own
        base_model=str(Path(base) / "."),
        sft_data=str(task / "sft-data"),
        few_shot=K,
        few_shot_seed=3,
        num_prompts=8,
        max_new_tokens=12,
        batch_size=8,
    )
    return evaluate.run(config, str(task / "prefs"), str(task / "eval"))


def test_examples_go_in_front_of_each_prompt_drawn_by_the_seed() -> None:
    examples = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(5)
    ]
    prompts = [[{"role": "user", "content": "Name two fruits."}]] * 3
    shots = evaluate.few_shot_prompts(examples, prompts, 2, seed=7)

    for shot in shots:
        assert len(shot) == 2 * 2 + 1
        assert shot[-1] == prompts[0][0]
        asked = [m["content"] for m in shot[:-1:2]]
        answered = [m["content"] for m in shot[1:-1:2]]
        # whole conversations, in order, no example twice in one prompt
        assert answered == [q.replace("q", "a") for q in asked]
        assert len(set(asked)) == 2
    assert evaluate.few_shot_prompts(examples, prompts, 2, seed=7) == shots
    assert evaluate.few_shot_prompts(examples, prompts, 2, seed=8) != shots
    with pytest.raises(DataError, match="at least 6"):
        evaluate.few_shot_prompts(examples, prompts, 6, seed=0)


@pytest.mark.slow
def test_report_shows_base_few_shot_and_fine_tuned_side_by_side(run: evaluate.EvalResult):
    metrics = run.metrics
    for side in ("base", "few_shot", "policy"):
        assert -1.0 <= metrics[f"gold_reward_{side}"] <= 1.0
    assert metrics["gold_gain_over_few_shot"] == pytest.approx(
        metrics["gold_reward_policy"] - metrics["gold_reward_few_shot"]
    )
    # the base model, loaded on its own, answers the plain prompts as the reference did
    assert metrics["gold_reward_base"] == metrics["gold_reward_reference"]

    report = run.report.read_text()
    assert "## Fine-tuning vs prompting" in report
    assert f"| scorer | base | base, {K}-shot | fine-tuned | fine-tuned − few-shot |" in report
    row = [evaluate._num(metrics[f"gold_reward_{side}"]) for side in ("base", "few_shot", "policy")]
    assert f"| gold | {' | '.join(row)} |" in report
    html = run.report.with_suffix(".html").read_text()
    assert "Fine-tuning vs prompting" in html and f"base, {K}-shot" in html


@pytest.mark.slow
def test_the_examples_reach_the_base_model_and_fine_tuning_beats_them(run: evaluate.EvalResult):
    samples = [json.loads(line) for line in (run.output_dir / "samples.jsonl").open()]
    assert all({"base", "few_shot"} <= set(s) for s in samples)
    assert all({"base", "few_shot"} <= set(s["scores"]["gold"]) for s in samples)
    # the examples change what the base model says
    assert any(s["base"] != s["few_shot"] for s in samples)
    # two examples do not teach a 10-step model the task in context; 60 more steps of SFT
    # teach it the format (measured: few-shot -1.0, fine-tuned -0.71)
    assert run.metrics["gold_gain_over_few_shot"] > 0.1


@pytest.mark.slow
def test_the_component_prompts_the_base_model_step_output(
    tuned: tuple[str, str], task: Path, tiny_tokenizer_dir: Path, tmp_path: Path
):
    # in a pipeline, the reference is the SFT model and the model fine-tuning started from is
    # the base model step's output: the baseline prompts that one, here the untrained tiny model
    from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

    from components.evaluate import evaluate as component

    def artifact(cls, name, uri=None):
        return cls(name=name, uri=str(uri or tmp_path / name), metadata={})

    base, policy = tuned
    component.python_func(
        policy=artifact(Model, "policy", policy),
        reference=artifact(Model, "reference", base),
        base_model=artifact(Model, "base", tiny_tokenizer_dir),
        data=artifact(Dataset, "data", task / "prefs"),
        sft_data=artifact(Dataset, "sft_data", task / "sft-data"),
        config={"few_shot": K, "num_prompts": 8, "max_new_tokens": 12, "batch_size": 8},
        metrics=artifact(Metrics, "metrics"),
        report=artifact(Markdown, "report.md"),
        report_html=artifact(HTML, "report.html"),
        evaluation=artifact(Artifact, "evaluation"),
    )
    samples = [json.loads(line) for line in (tmp_path / "evaluation" / "samples.jsonl").open()]
    assert len(samples) == 8
    # the untrained model's answers, not the reference's (which a missing base_model gives)
    assert sum(s["base"] != s["reference"] for s in samples) >= 6


@pytest.mark.parametrize(
    ("values", "fix"),
    [
        ({"few_shot": 2}, "set sft_data="),
        ({"few_shot": -1, "sft_data": "x"}, "few_shot must be >= 0"),
        ({"few_shot": 1.5, "sft_data": "x"}, "whole number"),
    ],
)
def test_bad_few_shot_options_name_the_fix(values: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        evaluate.EvalStageConfig(policy="a/b", reference="a/c", **values)


def test_few_shot_metrics_can_gate() -> None:
    config = evaluate.EvalStageConfig(
        policy="a/b",
        reference="a/c",
        sft_data="x",
        few_shot=2,
        gate_metric="gold_gain_over_few_shot",
    )
    assert config.gate_metric == "gold_gain_over_few_shot"
    with pytest.raises(ConfigError, match="unknown gate_metric"):
        evaluate.EvalStageConfig(policy="a/b", reference="a/c", gate_metric="gold_reward_few_shot")
