"""The config pattern: YAML plus overrides, type coercion, validation messages, flattening."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignpipe.config import (
    describe,
    flatten,
    is_secret_key,
    load_config,
    option,
    parse_overrides,
)
from alignpipe.errors import ConfigError


@dataclass
class Inner:
    r: int = option(8, help="rank")
    dropout: float = option(0.0, help="dropout")


@dataclass
class Example:
    name: str = option("x", help="a name")
    steps: int = option(10, help="steps")
    lr: float = option(1e-3, help="learning rate")
    packing: bool = option(False, help="pack sequences")
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", help="loss type")
    tags: list[str] = option(default_factory=list, help="tags")
    limit: int | None = option(None, help="optional limit")
    inner: Inner = field(default_factory=Inner, metadata={"help": "nested"})
    aws_secret_access_key: str | None = option(None, help="a secret")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}; try steps=10")


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlr: 0.01\ninner:\n  r: 4\n")
    cfg = load_config(Example, path, ["steps=7", "inner.dropout=0.1", "tags=[a, b]"])
    assert (cfg.steps, cfg.lr, cfg.inner.r, cfg.inner.dropout) == (7, 0.01, 4, 0.1)
    assert cfg.tags == ["a", "b"]


def test_scalars_coerce_to_declared_types():
    cfg = load_config(Example, None, ["lr=1", "limit=null", "packing=true", "name=12", "steps=4.0"])
    assert cfg.steps == 4 and isinstance(cfg.steps, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.limit is None
    assert cfg.packing is True
    assert cfg.name == "12"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("steps=abc", "steps must be int"),
        ("steps=2.5", "steps must be a whole number"),
        ("packing=maybe", "packing must be true or false"),
        ("loss=hinge", "loss must be one of 'sigmoid', 'ipo'"),
        ("stepz=3", "unknown option stepz"),
        ("inner.alpha=3", "unknown option inner.alpha"),
        ("steps=0", "try steps=10"),
        ("no-equals-sign", "write it like"),
    ],
)
def test_bad_values_name_the_option_and_fix(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(Example, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Example, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Example, listy)


def test_flatten_dotted_and_redacts_secrets():
    cfg = load_config(Example, None, ["aws_secret_access_key=hunter2", "inner.r=16"])
    flat = flatten(cfg)
    assert flat["inner.r"] == "16"
    assert flat["limit"] == ""
    assert flat["aws_secret_access_key"] == "***"
    assert "hunter2" not in repr(flat)


def test_describe_lists_nested_options_with_help():
    rows = {name: (default, text) for name, _, default, text in describe(Example)}
    assert rows["inner.r"] == (8, "rank")
    assert rows["tags"] == ([], "tags")


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a=1", "b=x", "c=", "d=[1, 2]"]) == {
        "a": 1,
        "b": "x",
        "c": "",
        "d": [1, 2],
    }


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("aws_secret_access_key", True),
        ("storage.password", True),
        ("hf_token", True),
        ("auth.token", True),
        ("openai_api_key", True),
        ("max_new_tokens", False),
        ("pad_token", False),
        ("tokenizer", False),
        ("eos_token_id", False),
        ("token_checks", False),
        ("mlflow_tracking_token", True),
        ("keyword", False),
    ],
)
def test_secret_keys_are_whole_words(key, secret):
    assert is_secret_key(key) is secret
