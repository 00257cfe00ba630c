"""A PostgreSQL server on loopback for MLflow's backend store (Debian's ``postgresql`` package).

PostgreSQL refuses to run as root. Started by root (as in CI containers), ``initdb`` and the
server run as the unprivileged ``postgres`` user that the Debian package creates, and the data
folder is handed to that user; started by anyone else, they run as the caller.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from stack.processes import StackError, spawn

BIN_ENV = "ALIGNPIPE_STACK_PG_BIN"
SERVICE_USER = "postgres"
SUPERUSER = "alignpipe"
DATABASE = "mlflow"
# fast shutdown: roll back open transactions, write a checkpoint, exit
STOP_SIGNAL = signal.SIGINT
STOP_TIMEOUT_S = 30.0


def bin_dir() -> Path:
    """The folder of ``initdb`` and ``postgres``: $ALIGNPIPE_STACK_PG_BIN, PATH, or Debian's."""
    if os.environ.get(BIN_ENV):
        candidates = [Path(os.environ[BIN_ENV])]
    else:
        on_path = shutil.which("initdb")
        debian = Path("/usr/lib/postgresql")
        versions = debian.glob("*/bin") if debian.is_dir() else []
        by_version = sorted(
            versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
        )
        candidates = [Path(on_path).parent] if on_path else []
        candidates += reversed(by_version)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise StackError(
        "PostgreSQL not found: install it (apt-get install -y postgresql), or set "
        f"{BIN_ENV} to the folder holding initdb and postgres"
    )


def service_user() -> str | None:
    """The user the server runs as: ``postgres`` when we are root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root and there is no {SERVICE_USER!r} user to run it "
            f"as; install Debian's postgresql package (it creates one), or useradd {SERVICE_USER}"
        ) from None
    return SERVICE_USER


def initialize(data_dir: Path, password: str, log_path: Path) -> None:
    """Create a database cluster in ``data_dir`` with a password-protected superuser.

    Raises:
        StackError: initdb failed, or the service user cannot reach ``data_dir``.
    """
    initdb = bin_dir() / "initdb"
    user = service_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        _check_reachable(data_dir, user)
    # the password goes through a file only the service user can read, gone after initdb (a
    # pipe on /dev/stdin would do, but a pipe created by root cannot be reopened by that user)
    pwfile = data_dir.parent / f".{data_dir.name}.pw"
    pwfile.touch(mode=0o600)
    pwfile.write_text(f"{password}\n")
    if user is not None:
        os.chown(pwfile, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    command = [
        str(initdb),
        f"--pgdata={data_dir}",
        f"--username={SUPERUSER}",
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
        "--encoding=UTF8",
        "--no-instructions",
    ]
    try:
        with log_path.open("ab") as log:
            done = subprocess.run(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=user,
                group=_group(user),
                extra_groups=[] if user else None,
                check=False,
            )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise StackError(f"initdb failed (status {done.returncode}); see {log_path}")


def start(data_dir: Path, port: int, log_path: Path, pid_path: Path) -> Any:
    """Start the server on ``127.0.0.1:port`` (no Unix socket); return the process."""
    command = [
        str(bin_dir() / "postgres"),
        "-D",
        str(data_dir),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        # no Unix socket: Debian's default folder (/var/run/postgresql) needs root to create
        "-k",
        "",
    ]
    return spawn(command, log_path=log_path, pid_path=pid_path, user=service_user())


def url(port: int, password: str, database: str = DATABASE, driver: str = "") -> str:
    """A connection URL; ``driver="psycopg"`` gives SQLAlchemy's name for psycopg 3."""
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{SUPERUSER}:{password}@127.0.0.1:{port}/{database}"


def probe(port: int, password: str) -> str | None:
    """Log in; None when that worked, else why it did not."""
    import psycopg

    try:
        with psycopg.connect(url(port, password, "postgres"), connect_timeout=2):
            return None
    except psycopg.Error as err:
        return " ".join(str(err).split())


def ensure_database(port: int, password: str, name: str = DATABASE) -> None:
    """Create the database ``name`` unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url(port, password, "postgres"), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _check_reachable(data_dir: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    found = subprocess.run(
        ["test", "-w", str(data_dir)], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[]
    )
    if found.returncode != 0:
        raise StackError(
            f"the {user} user cannot reach {data_dir} (a folder above it is private to root); "
            "put the stack's state where it can: make stack-up STACK_DIR=/tmp/alignpipe-stack "
            "(or python -m stack --dir /tmp/alignpipe-stack up)"
        )


def _group(user: str | None) -> int | None:
    return pwd.getpwnam(user).pw_gid if user else None
