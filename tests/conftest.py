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
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stack import StackError, processes, seaweedfs

# S3

S3_ACCESS_KEY = "alignpipe-test-key"
S3_SECRET_KEY = "alignpipe-test-secret"
S3_REGION = seaweedfs.REGION


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


def _raw_client(endpoint: str, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for the test server that ignores the caller's AWS configuration."""
    return seaweedfs.client(endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, max_attempts)


def _start_weed(root: Path) -> tuple[subprocess.Popen[bytes], S3Server, seaweedfs.WeedPorts]:
    """Start ``weed server`` under ``root`` on free ports; return the process, server and ports."""
    ports = seaweedfs.WeedPorts.free()
    log_path = root / "weed.log"
    try:
        process = seaweedfs.start(root, ports, log_path=log_path)
    except StackError as err:
        pytest.fail(str(err))
    return process, S3Server(seaweedfs.endpoint(ports), root / "data", log_path), ports


def _stop_weed(process: subprocess.Popen[bytes], ports: seaweedfs.WeedPorts) -> None:
    processes.stop({process.pid: (seaweedfs.STOP_SIGNAL, True)}, seaweedfs.STOP_TIMEOUT_S)
    seaweedfs.remove_sockets(ports)


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
        process, server, ports = _start_weed(root / f"try{attempt}")
        problem = seaweedfs.wait_ready(
            process, server.endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, server.log_path
        )
        if problem is None:
            break
        _stop_weed(process, ports)
        failures.append(f"{problem}; log tail:\n{server.log_tail()}")
    else:
        pytest.fail("SeaweedFS did not start:\n" + "\n---\n".join(failures))
    try:
        yield server
    finally:
        _stop_weed(process, ports)


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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests, the number restored after them.

    On a small shared CPU, more threads of a tiny model only contend. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
