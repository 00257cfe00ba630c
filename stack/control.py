"""Bring the local stack up and down: PostgreSQL, then SeaweedFS S3, then the MLflow server.

Everything the stack keeps lives in one folder (``.stack/`` by default): ``stack.json`` (ports
and the generated credentials, mode 0600), ``env`` (the variables a client exports), one data
folder, log file and pid file per server. ``up`` reuses that folder, so runs and artifacts
survive a ``down``/``up``; deleting the folder (after ``down``) starts from scratch.
"""

from __future__ import annotations

import json
import secrets
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stack import mlflow_server, postgres, seaweedfs
from stack.processes import (
    StackError,
    free_ports,
    log_tail,
    port_in_use,
    running_pid,
    stop,
    wait_until,
)
from stack.seaweedfs import WeedPorts

DEFAULT_DIR = Path(".stack")
START_TIMEOUT_S = 120.0
ARTIFACT_BUCKET = "mlflow"
DATA_BUCKET = "alignpipe"
ARTIFACTS_DESTINATION = f"s3://{ARTIFACT_BUCKET}/artifacts"
# in start order; stopped in reverse
SERVICES = ("postgres", "seaweedfs", "mlflow")
# what a live server's command line contains, to tell it from a process that reused its pid
_PROGRAMS = {"postgres": "postgres", "seaweedfs": "weed", "mlflow": "mlflow"}
# how each stops cleanly: signal, to the whole process group or the leader only, grace period
_STOP = {
    "postgres": (postgres.STOP_SIGNAL, False, postgres.STOP_TIMEOUT_S),
    "seaweedfs": (seaweedfs.STOP_SIGNAL, True, seaweedfs.STOP_TIMEOUT_S),
    "mlflow": (mlflow_server.STOP_SIGNAL, True, mlflow_server.STOP_TIMEOUT_S),
}
_STATE_FILE = "stack.json"


@dataclass(frozen=True)
class Stack:
    """One local stack: its folder, ports and credentials (generated at the first ``up``)."""

    root: Path
    postgres_port: int
    mlflow_port: int
    weed: WeedPorts
    access_key: str
    secret_key: str
    db_password: str
    mlflow_workers: int = 1

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return seaweedfs.endpoint(self.weed)

    def env(self) -> dict[str, str]:
        """What a client exports: the tracking URI, and S3 settings for ``s3://`` data."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": seaweedfs.REGION,
            "AWS_DEFAULT_REGION": seaweedfs.REGION,
        }

    def s3_client(self) -> Any:
        """A boto3 client for the stack's S3 endpoint with its credentials."""
        return seaweedfs.client(self.s3_endpoint, self.access_key, self.secret_key)

    def log_path(self, service: str) -> Path:
        return self.root / f"{service}.log"

    def pid_path(self, service: str) -> Path:
        return self.root / f"{service}.pid"

    def pid(self, service: str) -> int | None:
        """The pid of ``service`` when it runs, else None."""
        return running_pid(self.pid_path(service), _PROGRAMS[service])


def up(
    root: Path | str = DEFAULT_DIR,
    *,
    mlflow_port: int | None = None,
    s3_port: int | None = None,
    postgres_port: int | None = None,
    mlflow_workers: int | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Stack:
    """Start whatever part of the stack in ``root`` is not running; return the stack.

    Ports are chosen free at the first ``up`` and kept in ``root/stack.json``; the arguments fix
    them instead. ``timeout`` bounds each server's start.

    Raises:
        StackError: A server did not become ready (the message names its log file), a port is
            taken, or a running stack was asked for other ports.
    """
    stack = _settings(Path(root).resolve(), mlflow_port, s3_port, postgres_port, mlflow_workers)
    stopped = [s for s in SERVICES if stack.pid(s) is None]
    for service in stopped:  # all checked before any starts
        _check_port_free(stack, service)
    for service in stopped:
        stack = start_service(stack, service, timeout)
    _write_env(stack)
    return stack


def down(root: Path | str = DEFAULT_DIR) -> list[str]:
    """Stop the stack in ``root``; return the servers that were running. Safe to repeat."""
    stack = load(root)
    if stack is None:
        return []
    stopped = []
    # MLflow first, while its store and bucket still answer; the other two together
    for group in (("mlflow",), ("seaweedfs", "postgres")):
        running = [s for s in group if stack.pid(s) is not None]
        _stop(stack, running)
        stopped += running
    return [s for s in SERVICES if s in stopped]


def status(root: Path | str = DEFAULT_DIR) -> dict[str, int | None]:
    """The pid of each server of the stack in ``root``, or None where it is not running."""
    stack = load(root)
    return {s: stack.pid(s) if stack else None for s in SERVICES}


def load(root: Path | str = DEFAULT_DIR) -> Stack | None:
    """The stack whose state is in ``root``, or None when it was never started there."""
    path = Path(root).resolve() / _STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Stack(
        root=path.parent,
        postgres_port=data["postgres_port"],
        mlflow_port=data["mlflow_port"],
        weed=WeedPorts(**data["weed"]),
        access_key=data["access_key"],
        secret_key=data["secret_key"],
        db_password=data["db_password"],
        mlflow_workers=data.get("mlflow_workers", 1),
    )


def start_service(stack: Stack, service: str, timeout: float = START_TIMEOUT_S) -> Stack:
    """Start one server of ``stack`` on its ports and data, and wait until it is ready.

    Returns the stack, whose SeaweedFS internal ports change when one was taken meanwhile.
    """
    if service == "seaweedfs":
        stack = _free_internal_ports(stack)
    _check_port_free(stack, service)
    starters = {"postgres": _start_postgres, "seaweedfs": _start_seaweedfs, "mlflow": _start_mlflow}
    try:
        starters[service](stack, timeout)
    except BaseException:
        # a half-started server would hold its port and data folder
        _stop(stack, [service])
        raise
    return stack


def stop_service(stack: Stack, service: str) -> None:
    """Stop one server of ``stack`` (SIGKILL after its grace period)."""
    _stop(stack, [service])


def restart_service(stack: Stack, service: str, timeout: float = START_TIMEOUT_S) -> Stack:
    """Stop one server and start it again on the same ports and data."""
    stop_service(stack, service)
    return start_service(stack, service, timeout)


def env_lines(stack: Stack) -> list[str]:
    """``export NAME=value`` lines for a shell."""
    return [f"export {name}={shlex.quote(value)}" for name, value in stack.env().items()]


# -- the servers ---------------------------------------------------------------------------------


def _start_postgres(stack: Stack, timeout: float) -> None:
    data_dir = stack.root / "postgres"
    log_path = stack.log_path("postgres")
    if not (data_dir / "PG_VERSION").exists():
        postgres.initialize(data_dir, stack.db_password, log_path)
    process = postgres.start(data_dir, stack.postgres_port, log_path, stack.pid_path("postgres"))
    wait_until(
        lambda: postgres.probe(stack.postgres_port, stack.db_password),
        what=f"PostgreSQL on 127.0.0.1:{stack.postgres_port}",
        timeout=timeout,
        log_path=log_path,
        process=process,
    )
    postgres.ensure_database(stack.postgres_port, stack.db_password)


def _start_seaweedfs(stack: Stack, timeout: float) -> None:
    folder = stack.root / "seaweedfs"
    log_path = stack.log_path("seaweedfs")
    identity = seaweedfs.write_identity(folder / "s3.json", stack.access_key, stack.secret_key)
    seaweedfs.remove_sockets(stack.weed)
    process = seaweedfs.start(
        folder,
        stack.weed,
        identity=identity,
        log_path=log_path,
        pid_path=stack.pid_path("seaweedfs"),
    )
    problem = seaweedfs.wait_ready(
        process, stack.s3_endpoint, stack.access_key, stack.secret_key, log_path, timeout
    )
    if problem is not None:
        raise StackError(
            f"SeaweedFS on {stack.s3_endpoint} did not start: {problem}:\n{log_tail(log_path)}"
        )
    s3 = stack.s3_client()
    for bucket in (ARTIFACT_BUCKET, DATA_BUCKET):
        seaweedfs.create_bucket(s3, bucket)


def _start_mlflow(stack: Stack, timeout: float) -> None:
    log_path = stack.log_path("mlflow")
    process = mlflow_server.start(
        port=stack.mlflow_port,
        backend_uri=postgres.url(stack.postgres_port, stack.db_password, driver="psycopg"),
        artifacts=ARTIFACTS_DESTINATION,
        s3_endpoint=stack.s3_endpoint,
        access_key=stack.access_key,
        secret_key=stack.secret_key,
        workers=stack.mlflow_workers,
        folder=stack.root / "mlflow",
        log_path=log_path,
        pid_path=stack.pid_path("mlflow"),
    )
    wait_until(
        lambda: mlflow_server.probe(stack.mlflow_uri),
        what=f"MLflow on {stack.mlflow_uri}",
        timeout=timeout,
        log_path=log_path,
        process=process,
    )


def _stop(stack: Stack, services: list[str]) -> None:
    pids = {}
    timeout = 0.0
    for service in services:
        pid = stack.pid(service)
        if pid is not None:
            sig, whole_group, grace = _STOP[service]
            pids[pid] = (sig, whole_group)
            timeout = max(timeout, grace)
    stop(pids, timeout)
    for service in services:
        stack.pid_path(service).unlink(missing_ok=True)
        if service == "seaweedfs":
            seaweedfs.remove_sockets(stack.weed)


# -- settings ------------------------------------------------------------------------------------


def _settings(
    root: Path,
    mlflow_port: int | None,
    s3_port: int | None,
    postgres_port: int | None,
    mlflow_workers: int | None,
) -> Stack:
    """The saved stack in ``root`` with the requested changes, or a new one; saved."""
    stack = load(root)
    if stack is None:
        root.mkdir(parents=True, exist_ok=True)
        postgres_free, mlflow_free = free_ports(2)
        stack = Stack(
            root=root,
            postgres_port=postgres_port or postgres_free,
            mlflow_port=mlflow_port or mlflow_free,
            weed=WeedPorts.free(s3=s3_port),
            access_key="AP" + secrets.token_hex(9).upper(),
            secret_key=secrets.token_urlsafe(30),
            db_password=secrets.token_urlsafe(24),
            mlflow_workers=mlflow_workers or 1,
        )
    else:
        wanted = {
            "postgres": ("postgres_port", postgres_port),
            "mlflow": ("mlflow_port", mlflow_port),
        }
        changes: dict[str, Any] = {}
        for service, (field, port) in wanted.items():
            if port is not None and port != getattr(stack, field):
                _require_stopped(stack, service, f"port {port}")
                changes[field] = port
        if s3_port is not None and s3_port != stack.weed.s3:
            _require_stopped(stack, "seaweedfs", f"port {s3_port}")
            changes["weed"] = replace(stack.weed, s3=s3_port)
        if mlflow_workers is not None and mlflow_workers != stack.mlflow_workers:
            _require_stopped(stack, "mlflow", f"{mlflow_workers} workers")
            changes["mlflow_workers"] = mlflow_workers
        stack = replace(stack, **changes)
    _save(stack)
    return stack


def _require_stopped(stack: Stack, service: str, asked: str) -> None:
    if stack.pid(service) is not None:
        raise StackError(
            f"{service} of the stack in {stack.root} is running; asked for {asked}, stop it "
            "first (make stack-down)"
        )


def _check_port_free(stack: Stack, service: str) -> None:
    ports = {
        "postgres": stack.postgres_port,
        "seaweedfs": stack.weed.s3,
        "mlflow": stack.mlflow_port,
    }
    option = {"postgres": "--postgres-port", "seaweedfs": "--s3-port", "mlflow": "--mlflow-port"}
    if port_in_use(ports[service]):
        raise StackError(
            f"port {ports[service]} for {service} is taken by another program; pick a free one "
            f"({option[service]} N)"
        )


def _free_internal_ports(stack: Stack) -> Stack:
    """New ports for SeaweedFS's internal servers when one of them was taken meanwhile."""
    internal = [v for k, v in stack.weed.to_json().items() if k != "s3"]
    if not any(port_in_use(p) for p in internal):
        return stack
    stack = replace(stack, weed=WeedPorts.free(s3=stack.weed.s3))
    _save(stack)
    return stack


def _save(stack: Stack) -> None:
    data = {
        "postgres_port": stack.postgres_port,
        "mlflow_port": stack.mlflow_port,
        "weed": stack.weed.to_json(),
        "access_key": stack.access_key,
        "secret_key": stack.secret_key,
        "db_password": stack.db_password,
        "mlflow_workers": stack.mlflow_workers,
    }
    _write_private(stack.root / _STATE_FILE, json.dumps(data, indent=2) + "\n")


def _write_env(stack: Stack) -> None:
    header = [
        "# alignpipe local stack: MLflow (PostgreSQL backend, artifacts in "
        f"{ARTIFACTS_DESTINATION}) and S3 (bucket s3://{DATA_BUCKET} for data).",
        f"# Local throwaway credentials, generated at stack-up. Use: source {stack.root / 'env'}",
    ]
    _write_private(stack.root / "env", "\n".join([*header, *env_lines(stack)]) + "\n")


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
