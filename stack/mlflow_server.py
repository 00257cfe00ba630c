"""The MLflow tracking server of the stack: runs in PostgreSQL, artifacts proxied to S3.

The server holds the S3 credentials and streams artifacts to the bucket itself
(``--artifacts-destination``), so clients need only ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from stack.processes import spawn
from stack.seaweedfs import REGION

STOP_SIGNAL = signal.SIGTERM
STOP_TIMEOUT_S = 20.0
# AWS settings of the caller that would send the server's S3 calls elsewhere
_FOREIGN_AWS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def start(
    *,
    port: int,
    backend_uri: str,
    artifacts: str,
    s3_endpoint: str,
    access_key: str,
    secret_key: str,
    workers: int,
    folder: Path,
    log_path: Path,
    pid_path: Path,
) -> Any:
    """Start ``mlflow server`` on ``127.0.0.1:port``; return the process."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_AWS}
    env |= {
        # read by `mlflow server` as --backend-store-uri; kept off the command line, which any
        # local user can read in `ps`, because it holds the database password
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        # the job runner (GenAI evaluation jobs) starts seven more processes; nothing here uses it
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--artifacts-destination",
        artifacts,
    ]
    folder.mkdir(parents=True, exist_ok=True)
    return spawn(command, log_path=log_path, pid_path=pid_path, env=env, cwd=folder)


def probe(url: str) -> str | None:
    """None when the server answers and can list its artifact store, else why not.

    Listing the artifact root goes through the server to S3, so it also proves the bucket and
    the credentials.
    """
    checks = ("/health", "/api/2.0/mlflow-artifacts/artifacts")
    for path in checks:
        try:
            with urllib.request.urlopen(url + path, timeout=5) as answer:
                answer.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")[:300]
            return f"GET {path} answered {err.code}: {' '.join(body.split())}"
        except (urllib.error.URLError, OSError) as err:
            return f"GET {path} failed: {err}"
    return None
