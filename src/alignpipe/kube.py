"""Submit a Kubeflow training job through the Kubernetes API, re-attach to it, and follow it.

Plain HTTPS with a bearer token (the pod's service account, or a host and token from the
environment): the few calls the launcher needs do not justify the Kubernetes client library.
A job is looked up by name before it is created, and a 409 on create leads to the existing
job, so a launcher that restarts follows the job it started instead of starting another.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from alignpipe.errors import AlignpipeError, ConfigError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
HEARTBEAT_S = 600.0  # a log line this often while the state does not change
SPEC_ANNOTATION = "alignpipe/spec-sha256"
# label of a job's pods, for the kubectl logs hint
POD_SELECTOR = {
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
}

# kind option -> (apiVersion, plural of the API path, kind)
RESOURCES = {
    "trainjob": ("trainer.kubeflow.org/v1alpha1", "trainjobs", "TrainJob"),
    "pytorchjob": ("kubeflow.org/v1", "pytorchjobs", "PyTorchJob"),
}


class JobFailedError(AlignpipeError):
    """The training job ended in a Failed condition (or a local torchrun exited non-zero)."""


class JobTimeoutError(AlignpipeError):
    """The training job did not finish within the launcher's timeout."""


class KubernetesApiError(AlignpipeError):
    """The Kubernetes API refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth another try: no answer at all, a server error, or "too many requests"."""
        return self.status is None or self.status >= 500 or self.status == 429


class KubeClient:
    """A few calls of the Kubernetes API over plain HTTPS, with a bearer token.

    In a pod it uses the service account (its token is re-read on each call, as projected
    tokens rotate); elsewhere ``ALIGNPIPE_K8S_HOST`` and ``ALIGNPIPE_K8S_TOKEN`` (and
    ``ALIGNPIPE_K8S_CA_FILE`` for a private CA) name the server.
    """

    def __init__(
        self,
        host: str,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        attempts: int = 4,
        backoff_s: float = 2.0,
    ):
        self.host = host.rstrip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._token = token
        self._token_file = token_file
        self.timeout = timeout
        self._context = None
        if self.host.startswith("https://"):
            self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    @classmethod
    def from_environment(cls) -> KubeClient:
        host = os.environ.get("ALIGNPIPE_K8S_HOST")
        if host:
            return cls(
                host,
                token=os.environ.get("ALIGNPIPE_K8S_TOKEN"),
                ca_file=os.environ.get("ALIGNPIPE_K8S_CA_FILE"),
            )
        service_host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if service_host and (SERVICE_ACCOUNT_DIR / "token").exists():
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            service_host = f"[{service_host}]" if ":" in service_host else service_host
            return cls(
                f"https://{service_host}:{port}",
                token_file=SERVICE_ACCOUNT_DIR / "token",
                ca_file=SERVICE_ACCOUNT_DIR / "ca.crt",
            )
        raise ConfigError(
            "no Kubernetes API to talk to: run in a pod with a service account, or set "
            "ALIGNPIPE_K8S_HOST and ALIGNPIPE_K8S_TOKEN"
        )

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Send a request; return the decoded JSON answer or raise KubernetesApiError.

        An unreachable server, a 5xx or a 429 is retried ``attempts`` times with a doubling
        wait. A retried create that had gone through answers 409, which callers treat as "it
        exists".
        """
        attempt = 0
        while True:
            try:
                return self._send(method, path, body)
            except KubernetesApiError as err:
                attempt += 1
                if not err.transient or attempt >= self.attempts:
                    raise
                wait = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s; retrying in %.1f s", err, wait)
                time.sleep(wait)

    def _send(self, method: str, path: str, body: Any) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.host + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        token = self._bearer()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as r:
                raw = r.read()
        except urllib.error.HTTPError as err:
            detail = _status_message(err)
            raise KubernetesApiError(
                f"{method} {path}: HTTP {err.code} {detail}".rstrip(), err.code
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise KubernetesApiError(
                f"{method} {path}: cannot reach {self.host} ({reason})"
            ) from None
        return json.loads(raw) if raw else {}

    def _bearer(self) -> str | None:
        if self._token_file:
            return Path(self._token_file).read_text(encoding="utf-8").strip()
        return self._token


def _status_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read() or b"{}").get("message", ""))
    except (ValueError, AttributeError):
        return ""


def resource_path(kind: str, namespace: str, name: str | None = None) -> str:
    api_version, plural, _ = RESOURCES[kind]
    path = f"/apis/{api_version}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def resolve_namespace(namespace: str | None = None) -> str:
    """The namespace given, else ``$ALIGNPIPE_K8S_NAMESPACE``, else this pod's own."""
    namespace = namespace or os.environ.get("ALIGNPIPE_K8S_NAMESPACE")
    if not namespace and (SERVICE_ACCOUNT_DIR / "namespace").exists():
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text(encoding="utf-8").strip()
    if not namespace:
        raise ConfigError("no namespace for the job; set namespace=<the pipeline's namespace>")
    return namespace


# -- submit, re-attach, follow ----------------------------------------------------------------


def submit_or_attach(
    client: KubeClient, namespace: str, manifest: dict[str, Any]
) -> tuple[dict, bool]:
    """Create the job, or find the one an earlier launcher of this run created.

    Returns the job as the API has it and whether it already existed. A GET comes first, so a
    restarted launcher never submits twice; a 409 on create (another launcher won the race)
    also leads to the existing job. An existing job that has failed is the reason this launcher
    runs again (a KFP retry): it is deleted and submitted anew, and the stage resumes from its
    checkpoints, rather than re-attaching to the failure.
    """
    kind = manifest["kind"].lower()
    name = manifest["metadata"]["name"]
    existing = _get(client, kind, namespace, name)
    state, detail = job_state(existing) if existing is not None else ("", "")
    if state == "Failed":
        log.warning(
            "%s %s/%s failed before (%s); deleting it and submitting it again",
            manifest["kind"], namespace, name, detail or "no detail",
        )  # fmt: skip
        _delete(client, kind, namespace, name)
        _wait_until_gone(client, kind, namespace, name)
        existing = None
    if existing is None:
        try:
            created = client.request("POST", resource_path(kind, namespace), manifest)
            log.info("created %s %s/%s", manifest["kind"], namespace, name)
            return created, False
        except KubernetesApiError as err:
            if err.status != 409:
                raise _explain(err, manifest["kind"], namespace) from None
        existing = _get(client, kind, namespace, name)
        if existing is None:
            raise KubernetesApiError(f"{manifest['kind']} {name} conflicted on create but is gone")
    ours = (existing.get("metadata") or {}).get("annotations", {}).get(SPEC_ANNOTATION)
    if ours != manifest["metadata"]["annotations"].get(SPEC_ANNOTATION):
        log.warning(
            "%s %s already exists with a different spec (another config for the same run and "
            "stage?); following it as it is",
            manifest["kind"],
            name,
        )
    log.info("re-attaching to existing %s %s/%s", manifest["kind"], namespace, name)
    return existing, True


def _get(client: KubeClient, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return client.request("GET", resource_path(kind, namespace, name))
    except KubernetesApiError as err:
        if err.status == 404:
            return None
        raise _explain(err, RESOURCES[kind][2], namespace) from None


def _explain(err: KubernetesApiError, kind: str, namespace: str) -> KubernetesApiError:
    """Add the usual fix to the API errors people hit first."""
    hints = {
        401: "the token was refused; check ALIGNPIPE_K8S_TOKEN or the pod's service account",
        403: f"the service account may not manage {kind}s in {namespace}; grant it get, create "
        f"and delete on {RESOURCES[kind.lower()][1]} ({RESOURCES[kind.lower()][0].split('/')[0]})",
        404: f"is the {kind} resource installed in this cluster? (kind=trainjob needs Kubeflow "
        "Trainer, kind=pytorchjob the training operator)",
    }
    hint = hints.get(err.status or 0)
    return KubernetesApiError(f"{err}; {hint}" if hint else str(err), err.status)


def job_state(job: Mapping[str, Any]) -> tuple[str, str]:
    """``(state, detail)`` of a TrainJob or PyTorchJob from its status conditions.

    The states are ``Succeeded`` and ``Failed`` (terminal), ``Suspended``, ``Running``,
    ``Restarting`` and ``Pending``. A TrainJob reports ``Complete`` where a PyTorchJob reports
    ``Succeeded``; both become ``Succeeded`` here.
    """
    status = job.get("status") or {}
    true = {
        c.get("type"): c
        for c in status.get("conditions") or []
        if str(c.get("status", "")).lower() == "true"
    }
    for kind, state in (
        ("Failed", "Failed"),
        ("Complete", "Succeeded"),
        ("Succeeded", "Succeeded"),
    ):
        if kind in true:
            condition = true[kind]
            detail = ": ".join(p for p in (condition.get("reason"), condition.get("message")) if p)
            return state, detail
    for kind in ("Suspended", "Restarting", "Running"):
        if kind in true:
            return kind, str(true[kind].get("message") or "")
    active = sum(int(j.get("active") or 0) for j in status.get("jobsStatus") or [])
    return ("Running", f"{active} active") if active else ("Pending", "")


def follow(
    client: KubeClient,
    namespace: str,
    job: Mapping[str, Any],
    *,
    timeout_s: float,
    poll_s: float,
    delete_on_timeout: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll the job until it succeeds; log each change of state.

    The timeout counts from the job's creation, so a re-attached launcher keeps the original
    budget. Unreachable API servers and 5xx answers are retried until then.

    Raises:
        JobFailedError: The job reported a Failed condition.
        JobTimeoutError: The job had not finished ``timeout_s`` after its creation (it is
            deleted first when ``delete_on_timeout``).
    """
    kind = str(job["kind"]).lower()
    name = job["metadata"]["name"]
    created = _created_at(job)
    deadline = created + timeout_s
    last, logged = None, time.monotonic()
    while True:
        state, detail = job_state(job)
        if state != last or time.monotonic() - logged >= HEARTBEAT_S:
            since = (time.time() - created) / 60
            log.info(
                "%s %s: %s%s after %.0f min",
                job["kind"],
                name,
                state,
                f" ({detail})" if detail else "",
                since,
            )
            last, logged = state, time.monotonic()
        if state == "Succeeded":
            return state
        if state == "Failed":
            selector = f"{POD_SELECTOR.get(job['kind'], 'job-name')}={name}"
            raise JobFailedError(
                f"{job['kind']} {namespace}/{name} failed: {detail or 'no reason given'}; see "
                f"kubectl logs -n {namespace} -l {selector}"
            )
        if time.time() >= deadline:
            stop = "deleted it" if delete_on_timeout else "left it running"
            if delete_on_timeout:
                _delete(client, kind, namespace, name)
            raise JobTimeoutError(
                f"{job['kind']} {namespace}/{name} did not finish within {timeout_s:g} s "
                f"of its creation (last state {state}); {stop}. Raise timeout_s for longer runs"
            )
        sleep(min(poll_s, max(deadline - time.time(), 0.0)))
        try:
            job = client.request("GET", resource_path(kind, namespace, name))
        except KubernetesApiError as err:
            if err.status == 404:
                raise JobFailedError(
                    f"{job['kind']} {namespace}/{name} was deleted while it ran (last state "
                    f"{state}); re-run the step to start it again"
                ) from None
            if not err.transient:
                raise _explain(err, job["kind"], namespace) from None
            log.warning("%s; polling on until the timeout", err)


def _delete(client: KubeClient, kind: str, namespace: str, name: str) -> None:
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
    try:
        client.request("DELETE", resource_path(kind, namespace, name), body)
    except KubernetesApiError as err:
        log.warning("could not delete %s %s: %s", kind, name, err)


def _wait_until_gone(
    client: KubeClient, kind: str, namespace: str, name: str, timeout_s: float = 300.0
) -> None:
    # deletion of a job and its pods takes a moment; a create before it ends answers 409
    deadline = time.monotonic() + timeout_s
    while _get(client, kind, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise KubernetesApiError(
                f"{RESOURCES[kind][2]} {namespace}/{name} was still there {timeout_s:.0f} s "
                "after its deletion; delete it by hand (kubectl delete) and retry"
            )
        time.sleep(2.0)


def _created_at(job: Mapping[str, Any]) -> float:
    stamp = (job.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return time.time()
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
