"""``python -m pipelines``: compile every pipeline, or run one locally under kfp.local."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipelines import PIPELINES


def compile_all(out_dir: Path) -> list[Path]:
    """Write the IR YAML of every pipeline into ``out_dir``."""
    from kfp import compiler

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        written.append(path)
    return written


def run_local(name: str, arguments: dict, pipeline_root: Path) -> None:
    """Run a pipeline on this machine, every task in a subprocess of this environment."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root.resolve()),
        raise_on_error=True,
    )
    PIPELINES[name](**arguments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write IR YAML for every pipeline")
    comp.add_argument("--output", default="compiled", help="folder for the YAML files")
    loc = sub.add_parser("local", help="run a pipeline here under kfp.local")
    loc.add_argument("name", choices=sorted(PIPELINES))
    loc.add_argument("--config", required=True, help="YAML file of pipeline arguments")
    loc.add_argument("--pipeline-root", default="kfp-local", help="where artifacts go")
    args = parser.parse_args(argv)

    if args.command == "compile":
        for path in compile_all(Path(args.output)):
            print(f"compiled {path}")
        return 0
    arguments = yaml.safe_load(Path(args.config).read_text()) or {}
    run_local(args.name, arguments, Path(args.pipeline_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
