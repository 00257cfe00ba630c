"""The DPO stage on the synthetic task: config, reference handling, learning, resume, gold reward.

One module-scoped fixture writes the task, ingests its annotator votes into preference pairs and
SFT-trains a tiny model with the sft stage; every training test starts DPO from that model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import preference_stages
import pytest
import torch

from alignpipe import dpo, models, synthetic, training
from alignpipe.config import load_config
from alignpipe.data.build import read_split
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker

LN2 = math.log(2.0)
# Short runs: no checkpoint unless a test asks for one, one log line per run.
QUIET = ["training.save_steps=100000", "training.logging_steps=1000"]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preference pairs (``prefs``) and SFT conversations (``sft-data``) of the synthetic task.

    3000 voted pairs leave about 2400 after ties and duplicates; 10% of the prompts are held
    out (about 50 distinct ones), so the eval pairs ask prompts that DPO never trains on.
    """
    return preference_stages.write_task(tmp_path_factory.mktemp("dpo-task"), num_pairs=3000)


@pytest.fixture(scope="module")
def sft_model(task: Path) -> str:
    """A tiny model SFT-trained on the task by the sft stage; its output folder is the ref.

    About 8 epochs of SFT: enough for the model to answer in the task's format, while it still
    repeats items and mixes categories the way the noisy demonstrations do, which leaves DPO
    room.
    """
    return preference_stages.sft_tiny_model(task, max_steps=800, overrides=QUIET)


def dpo_config(model: str, *overrides: str) -> dpo.DpoStageConfig:
    return load_config(
        dpo.DpoStageConfig, None, [f"model={model}", "training.batch_size=32", *QUIET, *overrides]
    )


def logits(model_ref: str, text: str = "<|bos|><|user|>Name three fruits.<|assistant|>"):
    tokenizer = models.load_tokenizer(model_ref)
    model = models.load_causal_lm(model_ref)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def pair_tokens(model_ref: str, pairs: list[dict]) -> int:
    """Tokens of prompt + chosen plus prompt + rejected, over ``pairs``, by the chat template."""
    tokenizer = models.load_tokenizer(model_ref)

    def length(messages: list[dict]) -> int:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return len(encoded["input_ids"])

    return sum(
        length(p["prompt"] + p["chosen"]) + length(p["prompt"] + p["rejected"]) for p in pairs
    )


def weights(model_ref: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in models.load_causal_lm(model_ref).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# config


def test_config_loads_with_dotted_overrides() -> None:
    config = load_config(
        dpo.DpoStageConfig,
        None,
        ["model=/m", "loss_type=ipo", "beta=0.5", "peft.method=none", "training.max_steps=20"],
    )
    assert (config.model, config.loss_type, config.beta) == ("/m", "ipo", 0.5)
    assert (config.peft.method, config.training.max_steps) == ("none", 20)
    # the defaults: LoRA, sigmoid, merged model, reference scored at every step
    default = dpo.DpoStageConfig(model="/m")
    assert (default.peft.method, default.loss_type, default.beta) == ("lora", "sigmoid", 0.1)
    assert not default.save_adapter_only and not default.precompute_ref_log_probs


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ([], "set model="),
        (["model=/m", "loss_type=dpo"], "sigmoid, hinge, ipo"),
        (["model=/m", "beta=0"], "beta must be positive"),
        (["model=/m", "loss_type=exo_pair"], "label_smoothing > 0"),
        (["model=/m", "peft.method=prompt_tuning"], "save_adapter_only=true"),
        (["model=/m", "peft.method=none", "save_adapter_only=true"], "peft.method=lora"),
        (["model=/m", "dtype=int8"], "float32"),
    ],
)
def test_config_errors_name_the_fix(overrides: list[str], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        load_config(dpo.DpoStageConfig, None, overrides)


def test_loss_types_are_the_ones_trl_implements() -> None:
    from trl import DPOConfig

    field = DPOConfig.__dataclass_fields__["loss_type"]
    named = {part.split("'")[1] for part in field.metadata["help"].split("`")[1::2] if "'" in part}
    assert set(dpo.LOSS_TYPES) == named
    assert len(dpo.LOSS_TYPES) == 15


def test_conversations_are_rejected_with_the_fix(task: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ingest stage"):
        dpo.run(dpo_config("/no/model/needed"), str(task / "sft-data"), str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"no train\.parquet"):
        dpo.run(dpo_config("/no/model/needed"), str(tmp_path), str(tmp_path / "o"))


# ---------------------------------------------------------------------------------------------
# the reference


def test_lora_reference_is_the_policy_with_its_adapter_off(task: Path, sft_model: str) -> None:
    config = dpo_config(sft_model, "training.max_steps=5", "training.learning_rate=1e-2")
    policy, tokenizer = dpo.load_policy(config)
    train = dpo.load_pairs(str(task / "prefs"), "train")
    trainer = dpo.build_trainer(config, policy, tokenizer, train, None, task / "lora-ref")

    # no second model and no second adapter: the reference is the base with the adapter off
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    before = weights(sft_model)
    trainer.train()

    state = trainer.model.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)  # LoRA's B starts at zero
    for name, value in before.items():
        wrapped = f"base_model.model.{name}"
        if wrapped not in state:  # an adapted layer keeps its original weight as base_layer
            wrapped = wrapped.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[wrapped], value), name

    # what the trainer scores as the reference is exactly the SFT model
    prompt = "<|bos|><|user|>Name two animals.<|assistant|>"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        with trainer.model.disable_adapter():
            reference = trainer.model(input_ids=ids).logits
    assert torch.allclose(reference, logits(sft_model, prompt), atol=1e-5)
    assert not torch.allclose(trained, reference, atol=1e-3)


def test_full_fine_tuning_keeps_a_frozen_copy_as_reference(task: Path, sft_model: str) -> None:
    config = dpo_config(sft_model, "peft.method=none", "training.max_steps=3")
    policy, tokenizer = dpo.load_policy(config)
    train = dpo.load_pairs(str(task / "prefs"), "train")
    trainer = dpo.build_trainer(config, policy, tokenizer, train, None, task / "full-ref")

    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    ref_params = dict(reference.named_parameters())
    for name, param in trainer.model.named_parameters():
        # a copy: equal values in separate memory, frozen
        assert torch.equal(param, ref_params[name])
        assert param.data_ptr() != ref_params[name].data_ptr()
        assert not ref_params[name].requires_grad
    trainer.train()
    moved = trainer.model.model.embed_tokens.weight
    assert not torch.equal(moved, ref_params["model.embed_tokens.weight"])
    assert torch.equal(
        ref_params["model.embed_tokens.weight"], weights(sft_model)["model.embed_tokens.weight"]
    )

    # precomputing the reference's scores needs no copy at all
    precomputed = dpo_config(sft_model, "peft.method=none", "precompute_ref_log_probs=true")
    policy, tokenizer = dpo.load_policy(precomputed)
    trainer = dpo.build_trainer(precomputed, policy, tokenizer, train, None, task / "full-pre")
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)


# ---------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_lora_dpo_learns_the_held_out_preferences(task: Path, sft_model: str) -> None:
    tracker = NullTracker()
    config = dpo_config(
        sft_model,
        "training.max_steps=80",
        "training.learning_rate=2e-3",
        "beta=0.5",
    )
    result = dpo.run(config, str(task / "prefs"), str(task / "lora"), tracker=tracker)
    m = result.metrics

    # before training the policy is the reference: every implicit reward is exactly 0
    assert m["eval_rewards/accuracies_initial"] == 0.0
    assert m["eval_rewards/margins_initial"] == 0.0
    assert m["eval_loss_initial"] == pytest.approx(LN2, abs=1e-6)
    # after: held-out pairs (prompts DPO never saw) are ranked right well above chance;
    # measured 0.73 here (0.84 with LoRA on every linear layer, 0.82 with full fine-tuning)
    assert m["eval_rewards/accuracies"] > 0.6
    assert m["eval_rewards/margins"] > 0.05
    assert m["eval_loss"] < LN2 - 0.03
    assert (m["global_step"], m["resumed_from_step"], result.resumed_from) == (80.0, 0.0, None)
    assert m["train_seconds"] > 0 and m["train_loss"] < LN2

    # the merged model is a plain model that loads, and it is no longer the SFT model
    model_dir = Path(result.model_dir)
    assert model_dir == task / "lora" / "model"
    assert (model_dir / "model.safetensors").is_file() and not (
        model_dir / "adapter_config.json"
    ).exists()
    assert not torch.allclose(logits(str(model_dir)), logits(sft_model), atol=1e-3)
    # LoRA adapts the attention's q and v projections (peft's default for Llama): the merge
    # changes those and leaves every other weight as it was
    merged, start = weights(str(model_dir)), weights(sft_model)
    adapted = {k for k in start if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(adapted) == 4
    for name, value in start.items():
        assert torch.equal(merged[name], value) != (name in adapted), name

    # what was logged is what was saved
    assert json.loads((task / "lora" / "metrics.json").read_text()) == m
    assert tracker.dicts["metrics.json"] == m
    final = {k: v for k, v, step in tracker.metrics if step == 80 and k in m}
    assert final == pytest.approx(m)
    assert tracker.params["beta"] == "0.5" and tracker.params["peft.method"] == "lora"
    assert [d["context"] for d in tracker.datasets] == ["train", "eval"]


@pytest.mark.slow
def test_ipo_loss_falls_and_tokens_are_counted(task: Path, sft_model: str) -> None:
    from alignpipe.runner import run_stage

    train = read_split(str(task / "prefs"), "train")
    steps = math.ceil(len(train) / 32)  # exactly one epoch: every pair is seen once
    # through the runner, as the CLI and the components call a stage: key=value overrides
    result = run_stage(
        "dpo",
        str(task / "prefs"),
        str(task / "ipo"),
        overrides=[
            f"model={sft_model}",
            "loss_type=ipo",
            "beta=0.5",
            f"training.max_steps={steps}",
            "training.learning_rate=2e-3",
            "training.batch_size=32",
            *QUIET,
        ],
    )
    m = result.metrics
    # IPO's loss is (h - 1 / (2 beta))^2 with h the log-ratio difference, 0 at the start: 1
    assert m["eval_loss_initial"] == pytest.approx((1 / (2 * 0.5)) ** 2, rel=1e-6)
    assert m["eval_loss"] < 0.95  # measured 0.90
    assert m["eval_rewards/accuracies"] > 0.6
    assert m["eval_rewards/margins"] > 0

    # tokens processed: prompt + chosen and prompt + rejected of every pair, no padding
    assert m["train_tokens"] == pair_tokens(sft_model, train)


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_losses(task: Path, sft_model: str) -> None:
    losses = {}
    for precompute in ("false", "true"):
        tracker = NullTracker()
        config = dpo_config(
            sft_model,
            f"precompute_ref_log_probs={precompute}",
            "training.max_steps=6",
            "training.logging_steps=1",
            "training.learning_rate=5e-3",
        )
        dpo.run(config, str(task / "prefs"), str(task / f"pre-{precompute}"), tracker=tracker)
        losses[precompute] = [v for k, v, _ in tracker.metrics if k == "loss"]
    # step 1 is ln 2 for both (policy = reference); from step 2 on the policy has moved and
    # the losses agree only if the precomputed reference scores are the live ones
    assert len(losses["true"]) == 6 and losses["true"][0] == pytest.approx(LN2, abs=1e-6)
    assert losses["true"][-1] < losses["true"][0]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)


@pytest.mark.slow
def test_full_fine_tuning_learns(task: Path, sft_model: str) -> None:
    config = dpo_config(
        sft_model, "peft.method=none", "training.max_steps=40", "training.learning_rate=3e-4"
    )
    result = dpo.run(config, str(task / "prefs"), str(task / "full"))
    assert result.metrics["eval_rewards/accuracies"] > 0.6
    assert result.metrics["eval_loss"] < LN2
    assert not torch.equal(
        weights(result.model_dir)["model.embed_tokens.weight"],
        weights(sft_model)["model.embed_tokens.weight"],
    )


def test_adapter_only_saves_the_adapter_and_can_start_another_run(
    task: Path, sft_model: str
) -> None:
    config = dpo_config(
        sft_model, "save_adapter_only=true", "training.max_steps=3", "training.learning_rate=1e-2"
    )
    result = dpo.run(config, str(task / "prefs"), str(task / "adapter"))
    adapter = json.loads((Path(result.model_dir) / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(models.resolve_model(sft_model))
    trained = logits(result.model_dir)  # loads the adapter on its recorded base
    assert not torch.allclose(trained, logits(sft_model), atol=1e-4)

    # started from that adapter, a run merges it first: the reference is the adapted model
    policy, tokenizer = dpo.load_policy(dpo_config(result.model_dir))
    assert type(policy).__name__ == "LlamaForCausalLM"
    ids = tokenizer("<|bos|><|user|>Name three fruits.<|assistant|>", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids["input_ids"]).logits, trained, atol=1e-5)
    # a new adapter could not name its base: the base is the merge of base and old adapter
    with pytest.raises(ConfigError, match="save_adapter_only=false"):
        dpo.load_policy(dpo_config(result.model_dir, "save_adapter_only=true"))


def test_cli_runs_the_stage_with_overrides(
    task: Path, sft_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignpipe import cli

    out = task / "cli"
    args = ["dpo", str(task / "prefs"), "--output", str(out), f"model={sft_model}"]
    assert cli.main([*args, "training.max_steps=2", "beta=0.2", *QUIET]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]  # the trainer prints its logs above it
    assert summary.startswith("dpo: ") and summary.endswith(f"-> {out}")
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert (out / "model" / "model.safetensors").is_file()

    assert cli.main([*args, "loss_type=kto"]) == 2
    assert "loss_type must be one of sigmoid" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(task: Path, sft_model: str) -> None:
    out = task / "resume"
    train = read_split(str(task / "prefs"), "train")
    steps = math.ceil(len(train) / 32)  # one epoch, so the token count is known
    overrides = [
        f"model={sft_model}",
        f"training.max_steps={steps}",
        "training.save_steps=10",
        "beta=0.5",
        "training.batch_size=32",
        "training.learning_rate=2e-3",
        "training.logging_steps=1000",
    ]
    checkpoint = preference_stages.kill_at_first_checkpoint(
        "dpo", "DpoStageConfig", task / "prefs", out, overrides, training.last_checkpoint
    )
    step = training.checkpoint_step(checkpoint)
    assert 10 <= step < steps and step % 10 == 0

    tracker = NullTracker()
    result = dpo.run(
        load_config(dpo.DpoStageConfig, None, overrides), str(task / "prefs"), str(out), tracker
    )
    assert result.resumed_from == checkpoint
    assert result.metrics["resumed_from_step"] == step
    assert result.metrics["global_step"] == steps
    assert tracker.tags["alignpipe.resumed_from"] == checkpoint
    # the token count is trainer state: it carries on from the checkpoint, and the batches
    # before it are skipped, not seen twice, so the epoch's count comes out exact
    assert result.metrics["train_tokens"] == pair_tokens(sft_model, train)
    assert result.metrics["eval_rewards/accuracies"] > 0.6
    assert (out / "model" / "model.safetensors").is_file()


def test_a_lora_run_killed_after_its_last_checkpoint_trains_no_step_past_max_steps(
    task: Path, sft_model: str
) -> None:
    """The retry loads the adapter of checkpoint-2 of 2 and reports no loss of its own."""
    from safetensors.torch import load_file

    out = task / "finished"
    config = dpo_config(
        sft_model,
        "training.max_steps=2",
        "training.save_steps=2",
        "training.lr_scheduler=constant",
        "training.learning_rate=1e-2",
    )
    first = dpo.run(config, str(task / "prefs"), str(out))
    trained = load_file(Path(first.model_dir) / "model.safetensors")
    shutil.rmtree(first.model_dir)

    again = dpo.run(config, str(task / "prefs"), str(out))

    assert again.resumed_from == str(out / "checkpoints" / "checkpoint-2")
    assert (again.metrics["global_step"], again.metrics["resumed_from_step"]) == (2, 2)
    assert "train_loss" in first.metrics and "train_loss" not in again.metrics
    assert again.metrics["train_tokens"] == first.metrics["train_tokens"]
    reloaded = load_file(Path(again.model_dir) / "model.safetensors")
    assert all(torch.equal(reloaded[name], trained[name]) for name in trained)
    assert again.metrics["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the point of it all


def greedy_gold_reward(model_ref: str, prompts: list[list[dict]]) -> float:
    """Mean gold reward of greedy responses (16 new tokens at most) to ``prompts``."""
    tokenizer = models.load_tokenizer(model_ref)
    model = models.load_causal_lm(model_ref).eval()
    rewards = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        response = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        rewards.append(synthetic.gold_reward(prompt, response))
    return sum(rewards) / len(rewards)


@pytest.mark.slow
def test_dpo_raises_the_gold_reward_of_greedy_answers(task: Path, sft_model: str) -> None:
    # Full fine-tuning with a smooth step (batch 64, lr 2e-4, beta 0.5). Measured on the 49
    # held-out prompts: SFT 0.389 -> DPO 0.459 (0.443 with training.seed=1; batch 32 and lr
    # 1e-4 for 160 steps gives 0.445 and 0.458). Larger steps rank the pairs as well but lose
    # the gain: lr 3e-4 for 120 steps ends at 0.304, LoRA on every linear layer at lr 2e-3 at
    # 0.086 (greedy answers drift to repeated items and stray commas).
    config = dpo_config(
        sft_model,
        "peft.method=none",
        "beta=0.5",
        "training.max_steps=80",
        "training.batch_size=64",
        "training.learning_rate=2e-4",
    )
    result = dpo.run(config, str(task / "prefs"), str(task / "gold"))
    held_out = {}
    for pair in read_split(str(task / "prefs"), "eval"):
        held_out.setdefault(pair["prompt"][0]["content"], pair["prompt"])
    prompts = list(held_out.values())
    assert len(prompts) >= 40

    before = greedy_gold_reward(sft_model, prompts)
    after = greedy_gold_reward(result.model_dir, prompts)
    assert after > before, f"gold reward {before:.3f} -> {after:.3f}"
