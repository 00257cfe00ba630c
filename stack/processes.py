"""Starting, finding and stopping the stack's server processes.

Every server runs in a session of its own (its process group has the server's pid), so one
signal reaches the workers a server spawns too. A pid file records each one, so that a later
``python -m stack down`` finds what an earlier ``up`` started; before a pid from a file is
signalled, its command line must still name the expected program (pids are reused).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path

# Children started by this process: waiting on them reaps them, so a stopped server does not
# linger as a zombie that still answers os.kill(pid, 0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(Exception):
    """A server of the stack cannot be started, reached or stopped; the message names the fix."""


def free_ports(count: int) -> list[int]:
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


def port_in_use(port: int) -> bool:
    """Whether something listens on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def spawn(
    command: Sequence[str],
    *,
    log_path: Path,
    pid_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session, output appended to ``log_path``; record its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            user=user,
            group=_group_of(user),
            extra_groups=[] if user else None,
            start_new_session=True,
        )
    _CHILDREN[process.pid] = process
    if pid_path is not None:
        pid_path.write_text(f"{process.pid}\n")
    return process


def running_pid(pid_path: Path, program: str) -> int | None:
    """The pid in ``pid_path`` when that process is alive and its command names ``program``."""
    try:
        pid = int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _gone(pid):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return pid if program in command else None


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (gone already: nothing to do)."""
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(pids: Mapping[int, tuple[signal.Signals, bool]], timeout: float) -> None:
    """Stop several servers at once: signal each, wait, then SIGKILL what is left of its group.

    ``pids`` maps each group leader to the signal that shuts it down cleanly and whether the
    whole group gets it (MLflow's workers must, or they outlive the ``mlflow server`` process;
    PostgreSQL's children must not, the postmaster shuts them down in order).
    """
    for pid, (sig, whole_group) in pids.items():
        if whole_group:
            signal_group(pid, sig)
        else:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    for pid in pids:
        if not wait_gone(pid, max(deadline - time.monotonic(), 0.0)):
            signal_group(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
        # workers that outlived their leader
        signal_group(pid, signal.SIGKILL)
        _CHILDREN.pop(pid, None)


def wait_until(
    ready: Callable[[], str | None],
    *,
    what: str,
    timeout: float,
    log_path: Path,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``ready`` (None when ready, else why not) until it passes or ``timeout`` runs out.

    Raises:
        StackError: The process exited or the time ran out; the message names the log file and
            quotes its last lines.
    """
    deadline = time.monotonic() + timeout
    problem = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            problem = f"it exited with status {process.returncode}"
            break
        problem = ready() or ""
        if not problem:
            return
        time.sleep(0.25)
    else:
        problem = f"not ready within {timeout:.0f} s (last check: {problem})"
    raise StackError(f"{what} did not start: {problem}; see {log_path}:\n{log_tail(log_path)}")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _gone(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is not None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie has exited; its parent has not reaped it yet


def _group_of(user: str | None) -> int | None:
    if user is None:
        return None
    import pwd

    return pwd.getpwnam(user).pw_gid
