"""The PPO stage on the synthetic task: config, sampling temperature, reference, learning, resume.

One module-scoped fixture writes the task, ingests its annotator votes (the prompts PPO samples
and the held-out prompts it is measured on) and SFT-trains a tiny model with the sft stage;
every PPO run starts from that model and, unless a test says otherwise, is rewarded by the
task's gold rule, so that it does not depend on a reward model.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import preference_stages
import pytest
import torch
from safetensors.torch import load_file

from alignpipe import evaluate, models, ppo
from alignpipe.config import load_config
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker

# no checkpoints unless a test asks; one thread, for speed on a shared CPU
QUIET = ["training.save_steps=100000", "training.logging_steps=1000", "training.num_threads=1"]
# short answers suffice for the task; LoRA on every linear layer learns faster than q/v only
FAST = [
    "reward=gold",
    "max_new_tokens=16",
    "peft.lora.target_modules=all-linear",
    "training.lr_scheduler=constant",
    *QUIET,
]
ROLLOUT_STATS = (
    "score",
    "kl",
    "kl_coef",
    "entropy",
    "response_length",
    "explained_variance",
    "generation_tokens_per_s",
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "value_clip_fraction",
    "approx_kl",
    "train_tokens_per_s",
    "ppo_steps",
)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preference pairs (``prefs``: 520 distinct train and 49 held-out prompts) and SFT data."""
    return preference_stages.write_task(tmp_path_factory.mktemp("ppo-task"), num_pairs=3000)


@pytest.fixture(scope="module")
def sft_model(task: Path) -> str:
    """A tiny model SFT-trained on the task (the recipe of the DPO tests), as an output folder.

    It answers in the task's format, but sampled at temperature 1 it mixes categories and
    miscounts often: its mean gold reward is near 0 of a possible 1, which leaves PPO room.
    """
    return preference_stages.sft_tiny_model(task, max_steps=800, overrides=QUIET)


def ppo_config(model: str, *overrides: str) -> ppo.PpoStageConfig:
    return load_config(ppo.PpoStageConfig, None, [f"model={model}", *FAST, *overrides])


def train_on_gold(
    config: ppo.PpoStageConfig, learner: ppo.Learner, tokenizer, task: Path, name: str
) -> tuple[bool, NullTracker]:
    """PPO iterations on the task's train prompts against the gold rule; what it logged."""
    tracker = NullTracker()
    prompts = ppo.load_prompts(str(task / "prefs"), "train")
    scorer = evaluate.GoldScorer()
    stopped = ppo.train(config, learner, tokenizer, prompts, scorer, task / name, tracker)
    return stopped, tracker


def token_logprobs(model, prompt_ids, response_ids, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of each response token, by hand, one sequence."""
    ids = torch.tensor([[*prompt_ids, *response_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(prompt_ids) - 1  # the logit at position t predicts token t + 1
    scores = torch.log_softmax(logits[start : start + len(response_ids)] / temperature, dim=-1)
    return scores.gather(-1, torch.tensor(response_ids).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# config and data


def test_config_loads_with_dotted_overrides() -> None:
    config = load_config(
        ppo.PpoStageConfig,
        None,
        ["model=/m", "reward=gold", "training.max_steps=20", "peft.method=none", "kl_coef=0.1"],
    )
    assert (config.reward, config.training.max_steps, config.peft.method) == ("gold", 20, "none")
    assert config.kl_coef == 0.1
    default = ppo.PpoStageConfig(model="/m", reward_model="/rm")
    assert (default.reward, default.value_head, default.peft.method) == (
        "reward_model",
        "policy",
        "lora",
    )
    assert (default.gamma, default.lam, default.clip_range, default.vf_coef) == (
        1.0,
        0.95,
        0.2,
        0.1,
    )
    assert (default.top_k, default.top_p, default.kl_estimator) == (0, 1.0, "k1")
    assert default.whiten_advantages and not default.adaptive_kl
    assert default.max_kl_to_reference is None and default.early_stop_kl is None


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ([], "set model="),
        (["model=/m"], "set reward_model="),
        (["model=/m", "reward=gold", "value_head=reward_model"], "set reward_model="),
        (["model=/m", "reward=gold", "peft.method=prompt_tuning"], "peft.method=lora or none"),
        (["model=/m", "reward=gold", "mini_batch_size=24"], "must divide rollout_batch_size"),
        (["model=/m", "reward=gold", "training.gradient_accumulation_steps=2"], "=1"),
        (["model=/m", "reward=gold", "temperature=0"], "temperature must be > 0"),
        (["model=/m", "reward=gold", "top_p=0"], r"top_p must be in \(0, 1\]"),
        (["model=/m", "reward=gold", "lam=1.5"], r"lam must be in \[0, 1\]"),
        (["model=/m", "reward=gold", "kl_estimator=k2"], "kl_estimator must be one of"),
        (["model=/m", "reward=gold", "adaptive_kl=true", "kl_target=0"], "kl_target=6"),
        (["model=/m", "reward=gold", "max_kl_to_reference=0"], "or unset for no limit"),
        (["model=/m", "reward=gold", "peft.method=none", "save_adapter_only=true"], "lora"),
        (["model=/m", "reward=gold", "training.precision=fp16"], "bf16 or fp32"),
        (["model=/m", "reward=gold", "training.gradient_checkpointing=true"], "set it to false"),
        (["model=/m", "reward=gold", "training.eval_steps=5"], "leave training.eval_steps unset"),
    ],
)
def test_config_errors_name_the_fix(overrides: list[str], fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        load_config(ppo.PpoStageConfig, None, overrides)


def test_prompts_come_from_pairs_or_conversations(task: Path, tmp_path: Path) -> None:
    prompts = ppo.load_prompts(str(task / "prefs"), "train")
    held_out = ppo.load_prompts(str(task / "prefs"), "eval")
    assert (len(prompts), len(held_out)) == (520, 49)
    texts = {p[-1]["content"] for p in prompts}
    assert len(texts) == 520 and not texts & {p[-1]["content"] for p in held_out}
    # a conversation's prompt is everything before its last assistant turn
    conversations = ppo.load_prompts(str(task / "sft-data"), "eval")
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in conversations)
    with pytest.raises(DataError, match=r"no train\.parquet"):
        ppo.load_prompts(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------
# sampling and log-probabilities


def test_log_probs_use_the_temperature_the_sampler_used(sft_model: str) -> None:
    config = ppo_config(sft_model, "temperature=0.5", "max_new_tokens=1", "training.batch_size=500")
    tokenizer = models.load_tokenizer(sft_model)
    model = models.load_causal_lm(sft_model).eval()
    prompt = [{"role": "user", "content": "Name three fruits."}]
    draws = 4000
    generation = ppo.sample(config, model, tokenizer, [prompt] * draws, seed=0)
    batch = ppo.pack(generation.prompt_ids, generation.response_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = ppo.forward(model, batch, config.temperature)[0][:, 0]
        logp_t1 = ppo.forward(model, batch, 1.0)[0][:, 0]
    # the log-probs are those of softmax(logits / 0.5), computed by hand
    first = generation.response_ids[0]
    assert logp[0].item() == pytest.approx(
        token_logprobs(model, generation.prompt_ids[0], first, 0.5).item(), abs=1e-5
    )
    # and they are the distribution the sampler drew from: the three commonest first tokens
    # come as often as exp(logp) says (4 standard errors), not as often as at temperature 1
    counts = collections.Counter(r[0] for r in generation.response_ids)
    for token, count in counts.most_common(3):
        row = next(i for i, r in enumerate(generation.response_ids) if r[0] == token)
        p, p_t1 = logp[row].exp().item(), logp_t1[row].exp().item()
        error = 4 * (p * (1 - p) / draws) ** 0.5
        assert abs(count / draws - p) < error, tokenizer.decode([token])
        assert abs(count / draws - p_t1) > error, tokenizer.decode([token])


@pytest.fixture(scope="module")
def learned(task: Path, sft_model: str) -> dict:
    """A LoRA learner after 3 PPO iterations at temperature 0.7, and its weights from before."""
    config = ppo_config(
        sft_model,
        "temperature=0.7",
        "rollout_batch_size=32",
        "training.max_steps=3",
        "training.learning_rate=3e-3",
    )
    learner, tokenizer = ppo.build_learner(config)
    before = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    head = {n: p.detach().clone() for n, p in learner.value_head.named_parameters()}
    stopped, tracker = train_on_gold(config, learner, tokenizer, task, "learned")
    assert not stopped and learner.iteration == 3
    return {
        "config": config,
        "learner": learner,
        "tokenizer": tokenizer,
        "prompts": ppo.load_prompts(str(task / "prefs"), "train"),
        "before": before,
        "head_before": head,
        "tracker": tracker,
    }


def test_adapter_and_value_head_learn_while_base_weights_stay(learned: dict) -> None:
    learner, before = learned["learner"], learned["before"]
    trained = {n for n, p in learner.policy.named_parameters() if p.requires_grad}
    # LoRA on every linear layer of 2 blocks: 7 projections x (A, B) x 2 layers
    assert len(trained) == 28 and all("lora_" in n for n in trained)
    for name, param in learner.policy.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name in trained), name
        if "lora_B" in name:  # LoRA's B starts at zero, so the adapter starts as a no-op
            assert before[name].abs().sum() == 0 and param.abs().sum() > 0
    head = dict(learner.value_head.named_parameters())
    assert set(head) == {"linear.weight", "linear.bias"}
    for name, param in head.items():
        assert learned["head_before"][name].abs().sum() == 0  # zero-initialised
        assert param.abs().sum() > 0, name

    # every iteration logged its statistics at its own step
    logged = collections.defaultdict(set)
    for key, _, step in learned["tracker"].metrics:
        logged[key].add(step)
    for key in ROLLOUT_STATS:
        assert logged[key] == {1, 2, 3}, key
    # every epoch of every iteration ran: 4 epochs x 32 / 16 responses per step
    steps = [v for k, v, _ in learned["tracker"].metrics if k == "ppo_steps"]
    assert steps == [8.0, 8.0, 8.0]


def test_reference_is_the_sft_model_and_log_probs_are_tempered(
    learned: dict, sft_model: str
) -> None:
    config, learner, tokenizer = learned["config"], learned["learner"], learned["tokenizer"]
    rollout = ppo.collect_rollout(
        config, learner, tokenizer, learned["prompts"][:4], evaluate.GoldScorer()
    )
    reference = models.load_causal_lm(sft_model).eval()
    prompt_ids = rollout.batch.input_ids.tolist()
    policy_moved = 0.0
    for row in range(4):
        length = int(rollout.batch.mask[row].sum())
        response = rollout.batch.response_ids[row, :length].tolist()
        start = int(rollout.batch.positions[row, 0]) + 1
        prompt = prompt_ids[row][:start]
        # with the adapter off, the policy scores exactly as the SFT model, at temperature 0.7
        expected = token_logprobs(reference, prompt, response, temperature=0.7)
        torch.testing.assert_close(rollout.ref_logp[row, :length], expected, atol=1e-5, rtol=0)
        # the rollout's log-probs are the trained policy's at the same temperature (and the
        # adapter is back on after the reference's pass)
        with torch.no_grad():
            policy = token_logprobs(learner.policy, prompt, response, temperature=0.7)
        torch.testing.assert_close(rollout.logp[row, :length], policy, atol=1e-5, rtol=0)
        policy_moved = max(policy_moved, (policy - expected).abs().max().item())
    assert policy_moved > 1e-3
    # the KL penalty is the difference of the two, per token (k1)
    kl = (rollout.logp - rollout.ref_logp) * rollout.batch.mask
    torch.testing.assert_close(rollout.kl, kl)


def test_full_fine_tuning_keeps_a_frozen_copy_as_reference(task: Path, sft_model: str) -> None:
    config = ppo_config(
        sft_model, "peft.method=none", "rollout_batch_size=16", "training.max_steps=1"
    )
    learner, tokenizer = ppo.build_learner(config)
    reference = learner.reference
    assert reference is not None and reference is not learner.policy
    assert not any(p.requires_grad for p in reference.parameters())
    start = models.load_causal_lm(sft_model).state_dict()
    train_on_gold(config, learner, tokenizer, task, "full")
    name = "model.embed_tokens.weight"
    assert not torch.equal(learner.policy.state_dict()[name], start[name])
    assert torch.equal(reference.state_dict()[name], start[name])
    with learner.reference_model() as scoring:
        assert scoring is reference


# ---------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_ppo_raises_the_held_out_gold_reward_within_the_kl_bound(
    task: Path, sft_model: str
) -> None:
    # 60 iterations of 64 sampled answers; the held-out measure is 2 sampled answers to each
    # of the 49 held-out prompts, from one seed for the reference and the policy. Measured on
    # an AMD EPYC, training.seed 1 to 5: -0.064 -> 0.343 at KL 0.93, and gains of 0.33 to 0.48
    # on the other seeds, none near the bound. lr 2e-3 gains as much, but its rollout KL jumped
    # from about 1 to 10.45 at iteration 50 on that CPU (not on an Intel Xeon), which stopped
    # the run at the bound; lr 1e-2 collapses to -0.67.
    tracker = NullTracker()
    config = ppo_config(
        sft_model,
        "training.max_steps=60",
        "training.learning_rate=1e-3",
        "kl_coef=0.2",
        "max_kl_to_reference=3",
        "eval_samples_per_prompt=2",
    )
    result = ppo.run(config, str(task / "prefs"), str(task / "learn"), tracker=tracker)
    m = result.metrics

    assert m["eval_samples"] == 98
    assert m["reward"] > m["reward_initial"] + 0.15
    assert m["reward_delta"] == pytest.approx(m["reward"] - m["reward_initial"])
    assert 0 < m["kl_to_reference"] < config.max_kl_to_reference
    assert (m["iterations"], m["stopped_at_kl_bound"], m["resumed_from_iteration"]) == (60, 0, 0)
    # every epoch passes every rollout row, each a prompt of several tokens + up to 16 answer
    # tokens, through the policy: the cost the comparison report adds up
    passes = 60 * config.ppo_epochs * config.rollout_batch_size
    assert passes * 4 < m["train_tokens"] < passes * (64 + config.max_new_tokens)
    # the training reward rose too: the last ten rollouts against the first ten
    scores = [v for k, v, _ in tracker.metrics if k == "score"]
    assert len(scores) == 60 and sum(scores[-10:]) > sum(scores[:10]) + 1.0

    # the saved policy is a plain merged model that loads, and no longer the SFT model
    model_dir = Path(result.model_dir)
    assert model_dir == task / "learn" / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    merged, start = (
        load_file(model_dir / "model.safetensors"),
        load_file(Path(sft_model) / "model" / "model.safetensors"),
    )
    assert not torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"]
    )

    # what was logged is what was saved
    assert json.loads((task / "learn" / "metrics.json").read_text()) == m
    assert tracker.dicts["metrics.json"] == m
    assert tracker.params["kl_coef"] == "0.2" and tracker.params["peft.method"] == "lora"
    assert [d["context"] for d in tracker.datasets] == ["train", "eval"]


@pytest.mark.slow
def test_the_kl_bound_keeps_the_last_policy_within_it(task: Path, sft_model: str) -> None:
    # a learning rate that runs away (see above), a tight bound, and a checkpoint every step
    tracker = NullTracker()
    config = ppo_config(
        sft_model,
        "training.max_steps=40",
        "training.learning_rate=1e-2",
        "rollout_batch_size=32",
        "max_kl_to_reference=1",
        "save_adapter_only=true",
        "training.save_steps=1",
        "training.save_total_limit=100",
    )
    result = ppo.run(config, str(task / "prefs"), str(task / "bound"), tracker=tracker)
    m = result.metrics
    kept = int(m["iterations"])
    assert m["stopped_at_kl_bound"] == 1.0 and 1 <= kept < 39
    assert tracker.tags["alignpipe.stopped"] == "max_kl_to_reference"

    # rollout k + 1 sampled the policy after k updates; the last one measured over the bound
    # is the policy after kept + 1 updates, so the saved policy is the one after kept
    kl = {step: v for k, v, step in tracker.metrics if k == "kl" and step <= kept + 1}
    assert kl[kept + 1] <= 1.0
    checkpoints = task / "bound" / "checkpoints"
    assert (checkpoints / f"iter-{kept + 1}").is_dir() and not (
        checkpoints / f"iter-{kept + 2}"
    ).exists()
    saved = load_file(Path(result.model_dir) / "adapter_model.safetensors")

    def adapter(iteration: int) -> dict[str, torch.Tensor]:
        weights = load_file(checkpoints / f"iter-{iteration}" / "policy.safetensors")
        return {k.replace(".default", ""): v for k, v in weights.items()}

    assert set(saved) == set(adapter(kept))
    assert all(torch.equal(saved[k], v) for k, v in adapter(kept).items())
    assert not all(torch.equal(saved[k], v) for k, v in adapter(kept + 1).items())

    # a retry resumes from the newest checkpoint, the over-the-bound policy; its first rollout
    # is over the bound again, and it goes back to the policy within it that the checkpoint kept
    again = ppo.run(config, str(task / "prefs"), str(task / "bound"), tracker=NullTracker())
    assert again.metrics["resumed_from_iteration"] == kept + 1
    assert (again.metrics["iterations"], again.metrics["stopped_at_kl_bound"]) == (kept, 1.0)
    resaved = load_file(Path(again.model_dir) / "adapter_model.safetensors")
    assert all(torch.equal(resaved[k], v) for k, v in saved.items())


def test_early_stop_kl_ends_the_epochs_of_an_iteration(task: Path, sft_model: str) -> None:
    # The first step of an iteration measures the rollout's own policy (approx KL ~ 0); the
    # second measures the policy after one update, over any positive threshold.
    config = ppo_config(
        sft_model,
        "training.max_steps=2",
        "rollout_batch_size=32",
        "training.learning_rate=3e-3",
        "early_stop_kl=1e-6",
    )
    learner, tokenizer = ppo.build_learner(config)
    _, tracker = train_on_gold(config, learner, tokenizer, task, "early")
    assert [v for k, v, _ in tracker.metrics if k == "ppo_steps"] == [2.0, 2.0]


def test_adaptive_kl_moves_the_coefficient_by_each_rollouts_kl(task: Path, sft_model: str) -> None:
    # the coefficient a rollout used follows from the one before and that rollout's KL, by the
    # controller's rule (tests/test_rl.py derives it by hand); a small horizon makes it move
    config = ppo_config(
        sft_model,
        "training.max_steps=3",
        "rollout_batch_size=16",
        "mini_batch_size=8",
        "training.learning_rate=3e-3",
        "adaptive_kl=true",
        "kl_coef=0.1",
        "kl_target=0.5",
        "kl_horizon=16",
    )
    learner, tokenizer = ppo.build_learner(config)
    _, tracker = train_on_gold(config, learner, tokenizer, task, "adaptive")
    coefs = [v for k, v, _ in tracker.metrics if k == "kl_coef"]
    kls = [v for k, v, _ in tracker.metrics if k == "kl"]
    assert coefs[0] == pytest.approx(0.1) and len(coefs) == len(kls) == 3
    afterwards = [*coefs[1:], learner.kl_controller.value]
    for before, kl, after in zip(coefs, kls, afterwards, strict=True):
        # n_steps = rollout_batch_size = kl_horizon, so the step is the whole clipped error
        error = min(max(kl / 0.5 - 1.0, -0.2), 0.2)
        assert after == pytest.approx(before * (1 + error))
    assert len(set(coefs)) == 3  # it moved every time


# ---------------------------------------------------------------------------------------------
# resume


RESUME = [
    "training.max_steps=6",
    "training.save_steps=2",
    "training.save_total_limit=10",
    "rollout_batch_size=16",
    "mini_batch_size=8",
    "training.learning_rate=3e-3",
    "eval_prompts=16",
]


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_unbroken_one(
    task: Path, sft_model: str
) -> None:
    out = task / "resume"
    overrides = [f"model={sft_model}", *FAST, *RESUME]
    checkpoint = preference_stages.kill_at_first_checkpoint(
        "ppo", "PpoStageConfig", task / "prefs", out, overrides, ppo.latest_checkpoint
    )
    done = int(Path(checkpoint).name.removeprefix("iter-"))
    assert done in (2, 4)

    tracker = NullTracker()
    config = load_config(ppo.PpoStageConfig, None, overrides)
    result = ppo.run(config, str(task / "prefs"), str(out), tracker=tracker)
    assert result.resumed_from == checkpoint
    assert tracker.tags["alignpipe.resumed_from"] == checkpoint
    assert result.metrics["resumed_from_iteration"] == done
    assert result.metrics["iterations"] == 6
    # the resumed run took only the iterations after the checkpoint
    assert sorted({s for k, _, s in tracker.metrics if k == "score"}) == list(range(done + 1, 7))

    # RNG states, optimizer, schedule and weights restored: it ends where an unbroken run ends
    whole = ppo.run(config, str(task / "prefs"), str(task / "unbroken"))
    for key in ("reward", "kl_to_reference", "response_length"):
        assert result.metrics[key] == pytest.approx(whole.metrics[key], abs=1e-6), key
    resumed = load_file(Path(result.model_dir) / "model.safetensors")
    unbroken = load_file(Path(whole.model_dir) / "model.safetensors")
    for name, value in unbroken.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)
    assert (out / "checkpoints" / "iter-6" / ppo.COMPLETE_MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# the reward model and the command line


@pytest.fixture(scope="module")
def reward_model_dir(task: Path, sft_model: str) -> str:
    """A reward model trained from the SFT model on the task's pairs (held-out accuracy ~0.72)."""
    from alignpipe import reward_model

    config = load_config(
        reward_model.RewardModelStageConfig,
        None,
        [
            f"model={sft_model}",
            "peft.method=none",
            "max_length=64",
            "training.max_steps=300",
            "training.learning_rate=1e-3",
            "training.batch_size=32",
            *QUIET,
        ],
    )
    reward_model.run(config, str(task / "prefs"), str(task / "rm"))
    return str(task / "rm")


@pytest.mark.slow
def test_ppo_against_a_reward_model_with_a_critic_from_it(
    task: Path, sft_model: str, reward_model_dir: str
) -> None:
    from alignpipe.reward_model import RewardScorer

    config = ppo_config(
        sft_model,
        "reward=reward_model",
        f"reward_model={reward_model_dir}",
        "value_head=reward_model",
        "training.max_steps=10",
        "training.save_steps=10",
        "training.learning_rate=2e-3",
        "kl_coef=0.2",
    )
    result = ppo.run(config, str(task / "prefs"), str(task / "with-rm"))
    m = result.metrics
    # measured: the reward model's mean score of held-out answers goes -0.358 -> 0.516
    assert m["reward"] > m["reward_initial"] + 0.3
    assert m["kl_to_reference"] < 3

    # the scores are the reward model's: it gives the reference's held-out answers that mean
    tokenizer = models.load_tokenizer(sft_model)
    prompts = ppo.load_prompts(str(task / "prefs"), "eval")
    answers = ppo.sample(config, models.load_causal_lm(sft_model), tokenizer, prompts, seed=0)
    scores = RewardScorer(reward_model_dir).score(prompts, answers.texts)
    assert m["reward_initial"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)

    # the critic started as the reward model's score head, and its head and adapter trained
    critic = load_file(task / "with-rm" / "checkpoints" / "iter-10" / "value_head.safetensors")
    head = next(v for k, v in critic.items() if k.endswith("score.modules_to_save.default.weight"))
    start = load_file(Path(reward_model_dir) / "model" / "model.safetensors")["score.weight"]
    assert head.shape == start.shape and not torch.equal(head, start)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in critic.items())


def test_cli_runs_the_stage_with_overrides(
    task: Path, sft_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignpipe import cli

    out = task / "cli"
    args = ["ppo", str(task / "prefs"), "--output", str(out), f"model={sft_model}", *FAST]
    assert cli.main([*args, "training.max_steps=2", "rollout_batch_size=16", "eval_prompts=8"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("ppo: ") and summary.endswith(f"-> {out}")
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 2
    assert (out / "model" / "model.safetensors").is_file()

    assert cli.main([*args, "mini_batch_size=5"]) == 2
    assert "must divide rollout_batch_size" in capsys.readouterr().err
