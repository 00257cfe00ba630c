"""The ``alignpipe`` command: one subcommand per stage, plus helpers for local work.

This is the one boundary where library errors become one-line messages and exit statuses:
0 on success, 2 on bad input or usage. Anything else is a bug and keeps its traceback.

Arguments after the subcommand are input paths, ``key=value`` config overrides (an argument is
an override when it looks like ``name=...`` or ``section.name=...`` and is not an existing path),
and options. ``--config FILE`` loads a YAML file first; overrides apply on top.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from alignpipe import __version__
from alignpipe.config import describe, load_config
from alignpipe.errors import AlignpipeError, ConfigError

log = logging.getLogger("alignpipe")

EXIT_OK, EXIT_BAD_INPUT = 0, 2
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str  # "module:ConfigClass" under alignpipe, imported only when the command runs
    handler: Callable[[Any, argparse.Namespace, list[str]], str]
    takes_inputs: bool = True
    tracked: bool = True

    def config_class(self) -> type:
        import importlib

        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(f"alignpipe.{module}"), name)


def _stage(name: str) -> Callable[[Any, argparse.Namespace, list[str]], str]:
    """A handler that runs a library stage through :func:`alignpipe.runner.run_stage`."""

    def handle(config: Any, args: argparse.Namespace, inputs: list[str]) -> str:
        from alignpipe.runner import run_stage

        result = run_stage(
            name,
            inputs,
            args.output,
            config=config,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            parent_run_id=args.parent_run_id,
        )
        return _summary(name, result, args.output)

    return handle


def _summary(stage: str, result: Any, output: str) -> str:
    stats = getattr(result, "stats", None)
    if stats is not None:
        return (
            f"{stage}: read {stats['read']}, kept {stats['kept']} (train {stats['train']}, eval "
            f"{stats['eval']}), quarantined {stats['quarantined']}; format {stats['format']} "
            f"-> {output}"
        )
    metrics = getattr(result, "metrics", {}) or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())[:8])
    return f"{stage}: {shown} -> {output}"


def _synth(config: Any, args: argparse.Namespace, inputs: list[str]) -> str:
    from alignpipe import synthetic

    paths = synthetic.write_task(config, args.output)
    return "synth: wrote " + ", ".join(str(p) for p in paths.values())


def _tiny_model(config: Any, args: argparse.Namespace, inputs: list[str]) -> str:
    from alignpipe import models
    from alignpipe.data.readers import read_rows

    texts = []
    for uri in inputs:
        for row in read_rows(uri):
            if row.data is not None:
                texts.extend(_strings(row.data))
    if not texts:
        raise ConfigError("tiny-model needs text to train its tokenizer; pass a JSONL corpus")
    model, _ = models.build_tiny_model(texts, config, args.output)
    params = sum(p.numel() for p in model.parameters())
    return f"tiny-model: {params:,} parameters -> {args.output}"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _launch(config: Any, args: argparse.Namespace, inputs: list[str]) -> str:
    from alignpipe import launch

    stage, *data = inputs
    try:
        return launch.summary(launch.launch(stage, data, args.output, config))
    except NotImplementedError as err:  # a stage that cannot run on several processes
        raise ConfigError(str(err)) from None


COMMANDS = (
    Command("prep", "normalize instruction/chat/pair data into train/eval splits",
            "prep:PrepConfig", _stage("prep")),
    Command("ingest", "turn preference pairs, feedback or annotation exports into pairs",
            "ingest:IngestConfig", _stage("ingest")),
    Command("sft", "supervised fine-tuning on conversations (TRL SFTTrainer)",
            "sft:SftStageConfig", _stage("sft")),
    Command("dpo", "direct preference optimisation on pairs (TRL DPOTrainer)",
            "dpo:DpoStageConfig", _stage("dpo")),
    Command("reward-model", "train a reward model on preference pairs (TRL RewardTrainer)",
            "reward_model:RewardModelStageConfig", _stage("reward_model")),
    Command("ppo", "PPO against a reward model or the gold rule, KL-penalised (own loop)",
            "ppo:PpoStageConfig", _stage("ppo")),
    Command("evaluate", "compare a policy with its reference; report and gate decision",
            "evaluate:EvalStageConfig", _stage("evaluate")),
    Command("multitask", "SFT on a weighted mixture of tasks, eval loss per task (TRL SFTTrainer)",
            "multitask:MultitaskStageConfig", _stage("multitask")),
    Command("contrastive", "train a text encoder on pairs: in-batch negatives or a similarity loss",
            "contrastive:ContrastiveStageConfig", _stage("contrastive")),
    Command("synth", "write the built-in synthetic task (SFT data, prompts, annotator votes)",
            "synthetic:SyntheticTaskOptions", _synth, takes_inputs=False, tracked=False),
    Command("tiny-model", "build a tiny causal LM and tokenizer from a text corpus",
            "models:TinyModelOptions", _tiny_model, tracked=False),
    Command("launch", "run a training stage on several GPUs: torchrun here, or a Kubeflow "
            "Trainer job across nodes (alignpipe launch STAGE INPUT... --nodes N)",
            "launch:LaunchOptions", _launch, tracked=False),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignpipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"alignpipe {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=os.environ.get("ALIGNPIPE_LOG_LEVEL", "INFO").upper(),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        what = "INPUT... " if cmd.takes_inputs else ""
        p.add_argument(
            "args", nargs="*", metavar=f"{what}key=value", help="inputs and config overrides"
        )
        p.add_argument("--output", "-o", required=True, help="output folder or s3:// prefix")
        p.add_argument("--config", "-c", help="YAML file of config options")
        if cmd.name in ("prep", "ingest"):
            p.add_argument("--format", help="input layout; default: auto-detect")
            p.add_argument(
                "--map",
                action="append",
                default=[],
                metavar="FIELD=COLUMN",
                help="read FIELD of the layout from COLUMN of the input (repeatable)",
            )
        if cmd.name == "launch":
            p.add_argument("--nodes", type=int, help="nodes to train on (option nodes)")
            p.add_argument("--gpus-per-node", type=int, help="accelerators (processes) per node")
            p.add_argument("--dry-run", action="store_true", help="print the job manifest only")
        if cmd.tracked:
            p.add_argument(
                "--tracking-uri",
                default=os.environ.get("MLFLOW_TRACKING_URI"),
                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; unset = no tracking)",
            )
            p.add_argument("--experiment", default="alignpipe", help="MLflow experiment name")
            p.add_argument("--parent-run-id", help="log as a child of this MLflow run")
        p.set_defaults(command_spec=cmd)
    options = sub.add_parser("options", help="list a command's config options with help")
    options.add_argument("stage", choices=[c.name for c in COMMANDS])
    return parser


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate input paths from ``key=value`` overrides."""
    inputs, overrides = [], []
    for arg in args:
        is_override = (
            _OVERRIDE.match(arg) and not arg.startswith("s3://") and not Path(arg).exists()
        )
        (overrides if is_override else inputs).append(arg)
    return inputs, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # inputs and overrides may come after options; argparse leaves those for a second look
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown or (rest and args.command == "options"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        args.args = [*args.args, *rest]
    _configure_logging(args.log_level)
    try:
        if args.command == "options":
            cmd = next(c for c in COMMANDS if c.name == args.stage)
            for name, typ, default, text in describe(cmd.config_class()):
                print(f"{name} ({typ}, default {json.dumps(default, default=str)}): {text}")
            return EXIT_OK
        cmd: Command = args.command_spec
        inputs, overrides = split_args(args.args)
        if inputs and not cmd.takes_inputs:
            parser.error(f"{cmd.name} takes no inputs, got {inputs[0]!r}")
        if cmd.takes_inputs and not inputs:
            parser.error(f"{cmd.name} needs at least one input file, folder or s3:// URI")
        extra = {}
        if getattr(args, "format", None):
            extra["format"] = args.format
        if getattr(args, "map", None):
            extra["mapping"] = dict(_field_column(m) for m in args.map)
        for name in ("nodes", "gpus_per_node", "dry_run"):
            if getattr(args, name, None) not in (None, False):
                extra[name] = getattr(args, name)
        config = load_config(cmd.config_class(), args.config, [*_dotted(extra), *overrides])
        print(cmd.handler(config, args, inputs))
        return EXIT_OK
    except AlignpipeError as err:
        print(f"alignpipe {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("alignpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`alignpipe options sft | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _field_column(item: str) -> tuple[str, str]:
    field, sep, column = item.partition("=")
    if not sep or not field or not column:
        raise ConfigError(f"--map {item!r} is not FIELD=COLUMN; e.g. --map prompt=question")
    return field, column


def _dotted(values: dict[str, Any]) -> list[str]:
    # go through the same YAML parsing as user overrides, so types coerce the same way
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
