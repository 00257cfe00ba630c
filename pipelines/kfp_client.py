"""Upload pipelines to Kubeflow Pipelines and start runs there, through ``kfp.Client``.

The host is ``--host`` or ``$KFP_HOST``. Authentication, first that applies: a bearer token in
``$KFP_TOKEN`` (CI); the projected service-account token of a pod (``$KF_PIPELINES_SA_TOKEN_PATH``,
by default ``/var/run/secrets/kubeflow/pipelines/token``), re-read before each request because
the kubelet rotates it; else none (a port-forward, or an endpoint behind its own proxy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignpipe.errors import AlignpipeError, ConfigError, TrackingError

logger = logging.getLogger(__name__)

HOST_ENV = "KFP_HOST"
TOKEN_ENV = "KFP_TOKEN"
# Where KFP's own client looks for the projected token, and the variable that moves it.
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"})


class KfpError(AlignpipeError):
    """The KFP API refused a request, or a run did not succeed."""


@dataclasses.dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version: str
    created_pipeline: bool
    created_version: bool


def connect(host: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (or ``$KFP_HOST``) with the first credentials that apply."""
    from kfp import Client
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    host = resolve_host(host)
    token = os.environ.get(TOKEN_ENV) or None
    token_path = os.environ.get(SA_TOKEN_ENV) or SA_TOKEN_PATH
    credentials = None
    if token is None and Path(token_path).is_file():
        credentials = ServiceAccountTokenVolumeCredentials(token_path)
    with warnings.catch_warnings(), _api_errors(f"connecting to {host}"):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP 2.0.0-beta.2+"
        return Client(host=host, existing_token=token, credentials=credentials)


def resolve_host(host: str | None) -> str:
    """``host``, else ``$KFP_HOST``; a ConfigError naming both when neither is set."""
    host = host or os.environ.get(HOST_ENV)
    if not host:
        raise ConfigError(f"no KFP host; pass --host URL or set {HOST_ENV}")
    return host


def git_version(repo: Path = Path(".")) -> str:
    """The version name for an upload: the commit's short SHA, marked when the tree differs.

    A dirty tree is not the commit, so its name gets ``-dirty-<UTC time>``: never the name a
    clean upload of that commit would take, and unique per upload.
    """
    try:
        sha = _git(repo, "rev-parse", "--short=12", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        raise ConfigError(f"{repo.resolve()} is not a git checkout; pass --version V") from None
    if dirty:
        return f"{sha}-dirty-{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    return sha


def upload(client: Any, package: Path, version: str, description: str = "") -> Uploaded:
    """Upload ``package`` as ``version`` of its pipeline, creating the pipeline if missing.

    A version that already exists under that name is left alone (a re-run of CI on the same
    commit), and reported as not created.
    """
    name = pipeline_name(package)
    with _api_errors(f"uploading {name}"):
        pipeline_id = client.get_pipeline_id(name)
        created_pipeline = pipeline_id is None
        if created_pipeline:
            pipeline_id = client.upload_pipeline(
                str(package), pipeline_name=name, description=description
            ).pipeline_id
        existing = find_version(client, pipeline_id, version)
        if existing is not None:
            return Uploaded(pipeline_id, existing, version, created_pipeline, False)
        uploaded = client.upload_pipeline_version(
            str(package), version, pipeline_id=pipeline_id, description=description
        )
    return Uploaded(pipeline_id, uploaded.pipeline_version_id, version, created_pipeline, True)


def find_version(client: Any, pipeline_id: str, version: str | None) -> str | None:
    """The id of the pipeline's version named ``version``, or of its newest one when None."""
    if version is None:
        listed = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    else:
        listed = client.list_pipeline_versions(pipeline_id, filter=_name_filter(version))
    versions = listed.pipeline_versions or []
    return versions[0].pipeline_version_id if versions else None


def start_run(
    client: Any,
    name: str,
    experiment: str,
    arguments: Mapping[str, Any],
    version: str | None = None,
    service_account: str | None = None,
) -> Any:
    """Create a run of the uploaded pipeline ``name`` (its KFP name) in ``experiment``.

    The experiment is created when missing; the run's pods run as ``service_account`` (the
    namespace's default pipeline runner when unset). Returns the run (``run_id``, ``state``).
    """
    with _api_errors(f"starting a run of {name}"):
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            raise KfpError(f"no pipeline {name} on the server; upload it first (upload NAME)")
        version_id = find_version(client, pipeline_id, version)
        if version_id is None:
            which = f"no version {version}" if version else "no versions"
            raise KfpError(f"pipeline {name} has {which}; upload it first (upload NAME)")
        experiment_id = client.create_experiment(experiment).experiment_id
        stamp = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        return client.run_pipeline(
            experiment_id,
            f"{name}-{version or 'latest'}-{stamp}",
            params=dict(arguments),
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=service_account,
        )


def wait(client: Any, run_id: str, timeout_s: float, poll_s: float = 10.0) -> str:
    """Poll the run until it ends; return its final state.

    Raises:
        KfpError: the run did not end within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with _api_errors(f"reading run {run_id}"):
            state = str(client.get_run(run_id).state or "PENDING")
        if state in FINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise KfpError(f"run {run_id} is still {state} after {timeout_s:g} s; raise --timeout")
        time.sleep(poll_s)


def run_url(host: str, run_id: str) -> str:
    """The run's page in the KFP UI (``$KF_PIPELINES_UI_ENDPOINT`` when the UI is elsewhere)."""
    base = os.environ.get(UI_HOST_ENV) or host
    return f"{base.rstrip('/')}/#/runs/details/{run_id}"


def mlflow_parent_run(tracking_uri: str, kfp_run_id: str) -> str:
    """Where the run's MLflow parent run is, or how to find it once the run has opened it."""
    from alignpipe import tracking

    hint = (
        f"search runs with tags.`{tracking.KFP_RUN_TAG}` = '{kfp_run_id}' "
        f"at {tracking.display_uri(tracking_uri)}"
    )
    try:
        tracking.check_connection(tracking_uri)
        client = tracking.mlflow_client(tracking_uri)
        runs = client.search_runs(
            experiment_ids=[e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{tracking.KFP_RUN_TAG}` = '{kfp_run_id}'",
        )
    except TrackingError as err:
        return f"not reachable from here ({err}); {hint}"
    parents = [r for r in runs if r.data.tags.get(tracking.STAGE_TAG) == "pipeline"]
    if not parents:
        return f"not opened yet; {hint}"
    return parent_run_url(tracking_uri, parents[0].info)


def parent_run_url(tracking_uri: str, info: Any) -> str:
    """The run's page in the MLflow UI for a server; its ids and the store otherwise."""
    from alignpipe import tracking

    shown = tracking.display_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{shown.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return f"run {info.run_id} in experiment {info.experiment_id} at {shown}"


def pipeline_name(package: Path) -> str:
    """The name a compiled package gives its pipeline (``alignpipe-dpo``)."""
    import yaml

    with open(package, encoding="utf-8") as stream:
        return next(yaml.safe_load_all(stream))["pipelineInfo"]["name"]


def check_arguments(pipeline: Any, arguments: Mapping[str, Any], source: str) -> None:
    """Raise a ConfigError naming the fix when ``arguments`` do not fit the pipeline."""
    inputs = pipeline.component_spec.inputs or {}
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise ConfigError(
            f"{source}: {unknown[0]} is not a parameter of {pipeline.name}; "
            f"parameters: {', '.join(sorted(inputs))}"
        )
    missing = sorted(n for n, spec in inputs.items() if not spec.optional and n not in arguments)
    if missing:
        raise ConfigError(f"{source}: {pipeline.name} needs {missing[0]}; add it to the file")


def _name_filter(name: str) -> str:
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    return json.dumps({"predicates": [predicate]})


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@contextlib.contextmanager
def _api_errors(doing: str) -> Iterator[None]:
    """Turn the API's exceptions into one line with the status and the server's message.

    kfp.Client prints its own "details" links; they go to stderr so that stdout stays ours.
    """
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except ApiException as err:
        detail = _server_message(err.body) or err.reason
        hint = "; check KFP_TOKEN" if err.status in (401, 403) else ""
        raise KfpError(f"{doing}: KFP answered {err.status} ({detail}){hint}") from None
    except HTTPError as err:
        raise KfpError(f"{doing}: cannot reach the KFP API ({err}); check --host") from None


def _server_message(body: Any) -> str:
    try:
        return str(json.loads(body).get("message", "")).splitlines()[0]
    except (TypeError, ValueError, AttributeError, IndexError):
        return ""
