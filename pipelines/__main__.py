"""``python -m pipelines``: compile the pipelines, run one here, or upload and run on Kubeflow.

``upload`` and ``run`` talk to a KFP API server (``--host`` or ``$KFP_HOST``; a token from
``$KFP_TOKEN`` or the pod's service account, see :mod:`pipelines.kfp_client`). Cluster settings
that are fixed at compile time come from ``$ALIGNPIPE_CLUSTER_CONFIG`` (see
:mod:`pipelines.resources`).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import yaml

from alignpipe.errors import AlignpipeError, ConfigError

try:
    from pipelines import PIPELINES, kfp_client, resources
except ConfigError as err:  # the cluster settings, read as the pipelines are defined
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

REPO = Path(__file__).resolve().parent.parent


def compile_all(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write the IR YAML of every pipeline (or of ``names``) into ``out_dir``."""
    from kfp import compiler

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or PIPELINES:
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(PIPELINES[name], str(path))
        written.append(path)
    resources.check_stage_names()
    return written


def run_local(name: str, arguments: dict, pipeline_root: Path) -> None:
    """Run a pipeline on this machine, every task in a subprocess of this environment."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root.resolve()),
        raise_on_error=True,
    )
    with print_kept():
        PIPELINES[name](**arguments)


@contextlib.contextmanager
def print_kept():
    """Put back ``builtins.print`` as it was, whatever a kfp.local run did to it.

    kfp.local indents a task's streamed logs by swapping ``builtins.print`` for an indenting one
    and restoring it afterwards. Tasks that run in parallel threads (two branches of a pipeline)
    restore out of order, and the indenting print outlives the run: every later ``print`` in the
    process would start with four spaces.
    """
    kept = builtins.print
    try:
        yield
    finally:
        builtins.print = kept


def upload(name: str, host: str | None, version: str | None) -> int:
    """Compile ``name`` and upload it as a new version (the git SHA unless ``version``)."""
    version = version or kfp_client.git_version(REPO)
    client = kfp_client.connect(host)
    with tempfile.TemporaryDirectory() as tmp:
        [package] = compile_all(Path(tmp), [name])
        description = PIPELINES[name].description or ""
        done = kfp_client.upload(client, package, version, description)
    pipeline = "created" if done.created_pipeline else "exists"
    print(f"pipeline {PIPELINES[name].name}: {pipeline} (id {done.pipeline_id})")
    uploaded = "uploaded" if done.created_version else "already uploaded, left as it was"
    print(f"version {done.version}: {uploaded} (id {done.version_id})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Start a run of the uploaded pipeline; with ``--wait``, exit 1 unless it succeeds."""
    pipeline = PIPELINES[args.name]
    arguments = read_arguments(Path(args.params))
    kfp_client.check_arguments(pipeline, arguments, args.params)
    client = kfp_client.connect(args.host)
    started = kfp_client.start_run(
        client, pipeline.name, args.experiment, arguments, args.version, args.service_account
    )
    url = kfp_client.run_url(kfp_client.resolve_host(args.host), started.run_id)
    print(f"KFP run: {url}")
    state = None
    if args.wait:
        state = kfp_client.wait(client, started.run_id, args.timeout, args.poll)
        print(f"KFP run {started.run_id}: {state}")
    print(f"MLflow parent run: {mlflow_line(arguments, started.run_id)}")
    return 0 if state in (None, "SUCCEEDED") else 1


def mlflow_line(arguments: dict, kfp_run_id: str) -> str:
    """The parent run's URL when MLflow can be searched from here, else how to find it."""
    from alignpipe.tracking import KFP_RUN_TAG

    uri = arguments.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return (
            f"tagged {KFP_RUN_TAG}={kfp_run_id}; set MLFLOW_TRACKING_URI (or tracking_uri in "
            "the params file) to have it looked up"
        )
    return kfp_client.mlflow_parent_run(uri, kfp_run_id)


def read_arguments(path: Path) -> dict:
    """Pipeline arguments from a YAML mapping of parameter: value."""
    try:
        arguments = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"parameters file {path} does not exist; check --params") from None
    except yaml.YAMLError:
        raise ConfigError(f"parameters file {path} is not valid YAML") from None
    if not isinstance(arguments, dict):
        raise ConfigError(f"parameters file {path} must hold a mapping of parameter: value")
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="write IR YAML for every pipeline")
    comp.add_argument("--output", default="compiled", help="folder for the YAML files")
    loc = sub.add_parser("local", help="run a pipeline here under kfp.local")
    loc.add_argument("name", choices=sorted(PIPELINES))
    loc.add_argument("--config", required=True, help="YAML file of pipeline arguments")
    loc.add_argument("--pipeline-root", default="kfp-local", help="where artifacts go")
    up = sub.add_parser("upload", help="compile a pipeline and upload it as a new version")
    up.add_argument("name", choices=sorted(PIPELINES))
    up.add_argument("--host", help="KFP API URL (default: $KFP_HOST)")
    up.add_argument("--version", help="version name (default: the git SHA)")
    start = sub.add_parser("run", help="run an uploaded pipeline on Kubeflow")
    start.add_argument("name", choices=sorted(PIPELINES))
    start.add_argument("--host", help="KFP API URL (default: $KFP_HOST)")
    start.add_argument("--experiment", required=True, help="KFP experiment, created if missing")
    start.add_argument("--params", required=True, help="YAML file of pipeline arguments")
    start.add_argument("--version", help="pipeline version name (default: the newest)")
    start.add_argument(
        "--service-account",
        help="Kubernetes service account the run's pods use, e.g. alignpipe-runner from "
        "manifests/ (default: the namespace's pipeline runner)",
    )
    start.add_argument("--wait", action="store_true", help="wait; exit 1 unless it succeeds")
    start.add_argument("--timeout", type=float, default=21600, help="seconds to wait at most")
    start.add_argument("--poll", type=float, default=30, help="seconds between status checks")
    args = parser.parse_args(argv)

    try:
        if args.command == "compile":
            for path in compile_all(Path(args.output)):
                print(f"compiled {path}")
            return 0
        if args.command == "upload":
            return upload(args.name, args.host, args.version)
        if args.command == "run":
            return run(args)
        run_local(args.name, read_arguments(Path(args.config)), Path(args.pipeline_root))
        return 0
    except AlignpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
