"""Tests for the built-in synthetic task: gold rule, behaviour policy, annotators, files."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict

import pytest

from alignpipe.config import describe
from alignpipe.data.annotations import aggregate
from alignpipe.errors import ConfigError, DataError
from alignpipe.synthetic import (
    CATEGORIES,
    MAX_REWARD,
    SyntheticTaskOptions,
    corpus,
    generate_prompts,
    generate_sft,
    generate_votes,
    gold_reward,
    sample_response,
    write_task,
)


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        # n = 3: (min(correct, n) - wrong - 0.5 * |items - n|) / n
        ("Name three fruits.", "apple, pear, plum.", 1.0),
        ("Name three fruits.", "Apple,PEAR , plum.", 1.0),  # case and spacing do not matter
        ("Name three fruits.", "apple, pear.", (2 - 0 - 0.5) / 3),
        ("Name three fruits.", "apple, dog, plum.", (2 - 1 - 0) / 3),
        ("Name three fruits.", "apple, apple, plum.", (2 - 1 - 0) / 3),
        ("Name three fruits.", "apple, dog, apple.", (1 - 2 - 0) / 3),
        ("Name three fruits.", "apple, pear, plum, grape.", (3 - 0 - 0.5) / 3),
        ("Name three fruits.", "apple, pear, plum", 1.0 - 0.25),  # missing final period
        ("Name three fruits.", "apple pear plum.", (0 - 1 - 1.0) / 3),  # one unknown item
        # n = 1, singular category word
        ("Give me one animal.", "dog.", 1.0),
        ("Give me one animal.", "dog, cat.", (1 - 0 - 0.5) / 1),
        ("Give me one animal.", "apple.", -1.0),
        ("Give me one animal.", "apple, pear, plum.", -1.0),  # (0 - 3 - 1) clipped
        ("List four colors.", "red, blue, green, pink.", 1.0),
        ("List four colors.", "red, blue, green, red, pink.", (4 - 1 - 0.5) / 4),
        ("List two tools.", "", -1.0),
        ("List two tools.", " . ", -1.0),
    ],
)
def test_gold_reward_follows_the_rule(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_gold_reward_accepts_prompt_messages_and_rejects_foreign_prompts():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name two tools."},
    ]
    assert gold_reward(messages, "saw, axe.") == 1.0
    with pytest.raises(DataError, match=r"use one like 'Name three fruits\.'"):
        gold_reward("Name three planets.", "mars.")
    with pytest.raises(DataError):
        gold_reward("Name seven fruits.", "apple.")


def test_behaviour_policy_leaves_room_to_improve():
    rng = random.Random(0)
    prompts = [f"Name {c} {k}." for c in ("two", "three", "four") for k in CATEGORIES]
    rewards = [gold_reward(p, sample_response(p, rng, 0.5)) for p in prompts * 40]
    mean = sum(rewards) / len(rewards)
    assert mean < MAX_REWARD - 0.5  # clearly below a perfect answer
    assert 0.02 < sum(r == MAX_REWARD for r in rewards) / len(rewards) < 0.5  # mixed quality
    # a perfect policy always hits the maximum; a worse one scores lower still
    assert {gold_reward(p, sample_response(p, rng, 1.0)) for p in prompts * 5} == {MAX_REWARD}
    worse = [gold_reward(p, sample_response(p, rng, 0.2)) for p in prompts * 40]
    assert sum(worse) / len(worse) < mean - 0.2


def test_generation_is_deterministic_per_seed():
    options = SyntheticTaskOptions(num_sft=50, num_prompts=20, num_pairs=30)
    assert generate_sft(options) == generate_sft(SyntheticTaskOptions(num_sft=50))
    assert generate_votes(options) == generate_votes(options)
    assert generate_prompts(options) == generate_prompts(options)
    other = SyntheticTaskOptions(seed=1, num_sft=50, num_prompts=20, num_pairs=30)
    assert generate_sft(other) != generate_sft(options)
    assert generate_votes(other) != generate_votes(options)


def test_record_shapes_and_lengths():
    options = SyntheticTaskOptions(num_sft=200, num_prompts=30, num_pairs=40, annotators=4)
    sft = generate_sft(options)
    assert len(sft) == 200
    assert all(r["task"] == "synthetic" for r in sft)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    assert max(len(r["messages"][0]["content"].split()) for r in sft) <= 10
    assert max(len(r["messages"][1]["content"].split()) for r in sft) <= 12

    prompts = generate_prompts(options)
    assert len(prompts) == 30
    assert all(list(p) == ["prompt"] and p["prompt"][0]["role"] == "user" for p in prompts)

    votes = generate_votes(options)
    assert len(votes) == 40 * 4
    assert votes[0]["item_id"] == "syn-00000"
    assert [v["annotator"] for v in votes[:4]] == [f"annotator-{k}" for k in range(1, 5)]
    assert all(v["response_a"] != v["response_b"] for v in votes)
    assert {v["choice"] for v in votes} <= {"a", "b", "tie"}


def test_noiseless_sharp_annotators_always_pick_the_gold_winner():
    options = SyntheticTaskOptions(num_pairs=300, noise=0.0, temperature=1e-3)
    votes = generate_votes(options)
    by_item = defaultdict(set)
    for row in votes:
        by_item[row["item_id"]].add(row["choice"])
    assert all(len(choices) == 1 for choices in by_item.values())  # unanimous

    result = aggregate(enumerate(votes, start=1), "votes")
    assert result.stats["pairs"] > 200
    for candidate in result.candidates:
        record = candidate.record
        prompt = record["prompt"][0]["content"]
        chosen = gold_reward(prompt, record["chosen"][0]["content"])
        rejected = gold_reward(prompt, record["rejected"][0]["content"])
        assert chosen > rejected
    # what was dropped are exact gold ties
    for dropped in result.dropped:
        row = votes[dropped.lines[0] - 1]
        assert gold_reward(row["prompt"], row["response_a"]) == pytest.approx(
            gold_reward(row["prompt"], row["response_b"])
        )


def test_more_annotator_noise_lowers_agreement():
    kappas = []
    for noise in (0.0, 0.15, 0.3, 0.45):
        options = SyntheticTaskOptions(num_pairs=300, noise=noise)
        result = aggregate(enumerate(generate_votes(options), start=1), "votes")
        kappas.append(result.stats["agreement"]["fleiss_kappa"])
    assert kappas == sorted(kappas, reverse=True)
    assert kappas[0] - kappas[-1] > 0.3


def test_default_votes_aggregate_cleanly_and_mostly_agree_with_gold():
    options = SyntheticTaskOptions()
    votes = generate_votes(options)
    result = aggregate(enumerate(votes, start=1), "votes")
    assert result.stats["malformed"] == 0
    assert result.stats["items"] == options.num_pairs
    assert result.stats["annotators"] == options.annotators
    assert all(d.reason.startswith("tie") for d in result.dropped)
    assert result.stats["pairs"] + result.stats["tied_items"] == options.num_pairs

    agree = decided = 0
    for candidate in result.candidates:
        record = candidate.record
        prompt = record["prompt"][0]["content"]
        chosen = gold_reward(prompt, record["chosen"][0]["content"])
        rejected = gold_reward(prompt, record["rejected"][0]["content"])
        if chosen != rejected:
            decided += 1
            agree += chosen > rejected
    assert decided > 0.7 * options.num_pairs
    assert agree / decided > 0.8


def test_corpus_vocabulary_stays_small():
    options = SyntheticTaskOptions(num_sft=300, num_prompts=50, num_pairs=100)
    words = {w.lower() for text in corpus(options) for w in re.findall(r"[A-Za-z]+", text)}
    members = {m for _, items in CATEGORIES.values() for m in items}
    assert members <= words  # every item tokenizes even if never sampled
    assert {"name", "list", "give", "me", "one", "four", "fruit", "fruits"} <= words
    assert len(words) <= 100


def test_write_task_files(tmp_path):
    options = SyntheticTaskOptions(num_sft=12, num_prompts=5, num_pairs=4, annotators=2)
    paths = write_task(options, tmp_path / "task")
    assert set(paths) == {"sft", "prompts", "votes", "task"}

    def read(name):
        return [json.loads(line) for line in paths[name].read_text().splitlines()]

    assert read("sft") == generate_sft(options)
    assert len(read("prompts")) == 5
    assert read("votes") == generate_votes(options)
    task = json.loads(paths["task"].read_text())
    assert task["options"]["num_pairs"] == 4
    assert task["rows"] == {"sft": 12, "prompts": 5, "votes": 8}
    assert "reward" in task["rule"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise": 0.6}, "lower it"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"num_pairs": 0}, "num_pairs must be at least 1"),
        ({"quality": 1.5}, r"quality must be in \[0, 1\]"),
        ({"tie_margin": -0.1}, "use 0 for no ties"),
    ],
)
def test_options_validation_names_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticTaskOptions(**kwargs)


def test_every_option_has_help():
    assert all(help_text for *_, help_text in describe(SyntheticTaskOptions))
