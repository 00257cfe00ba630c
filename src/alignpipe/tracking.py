"""Experiment tracking for stages: a small tracker object over MLflow, and its no-op twin.

A pipeline run is one MLflow parent run; each stage opens a child run with :func:`stage_run` and
logs through the :class:`Tracker` it yields. Every value passes through one sanitizer, so that
credentials never reach params or tags and over-long values are truncated instead of failing a
stage. MLflow is imported lazily: it takes about a second to import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from alignpipe import __version__
from alignpipe.config import flatten, is_secret_key
from alignpipe.errors import StorageError, TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# Environment variables holding credentials: their values are scrubbed from anything we log.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
REDACTED = "***"
TRUNCATED = "...[truncated]"

# Limits of mlflow 3.17 (mlflow/utils/validation.py). Older servers may reject values that the
# client accepts, so we truncate ourselves rather than rely on MLFLOW_TRUNCATE_LONG_VALUES.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DIGEST_LENGTH = 36
# Shorter env values are only scrubbed where they are the whole value: replacing every
# occurrence of a 3-character string would mangle unrelated params without protecting anything.
_MIN_SCRUB_SUBSTRING = 4

STAGE_TAG = "alignpipe.stage"
VERSION_TAG = "alignpipe.version"
ERROR_TAG = "alignpipe.error"
PARENT_TAG = "mlflow.parentRunId"
_DATASET_CONTEXT_TAG = "mlflow.data.context"

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


class Tracker(Protocol):
    """What a stage sees: one run to log params, metrics, datasets and artifacts to."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log a mapping of params, or a config dataclass (flattened to dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metric values at ``step``; non-finite values are skipped with a warning."""

    def log_dataset(
        self,
        name: str,
        path_or_uri: str,
        fingerprint: str,
        context: str,
        num_rows: int | None = None,
    ) -> None:
        """Record a dataset the stage read (``context`` "train", "eval") or wrote."""

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder under its own name, to the run's artifacts."""

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Store a small JSON document as the artifact ``name``."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run."""


class NullTracker:
    """The no-op twin of :class:`MlflowTracker`: logs nothing, remembers everything.

    Values pass through the same sanitizer as with MLflow (redaction, truncation, non-finite
    metrics dropped), so a test that asserts on these lists sees what MLflow would have stored.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.datasets: list[dict[str, Any]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.dicts: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Record params as MLflow would store them."""
        self.params.update(_clean_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record finite metrics as ``(key, value, step)``."""
        self.metrics.extend((k, v, step) for k, v in _finite_metrics(metrics).items())

    def log_dataset(
        self,
        name: str,
        path_or_uri: str,
        fingerprint: str,
        context: str,
        num_rows: int | None = None,
    ) -> None:
        """Record the dataset reference."""
        self.datasets.append(
            {
                "name": name,
                "source": _scrub(str(path_or_uri)),
                "fingerprint": fingerprint,
                "context": context,
                "num_rows": num_rows,
            }
        )

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Record the artifact path; the file must exist, as it must for MLflow."""
        path = _existing(local_path)
        self.artifacts.append((str(path), artifact_path))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Record the redacted document under ``name``."""
        self.dicts[_json_name(name)] = json.loads(_dump_json(data))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record tags as MLflow would store them."""
        self.tags.update(_clean_tags(tags))


class MlflowTracker:
    """A :class:`Tracker` writing to one MLflow run through an explicit-URI ``MlflowClient``.

    No global fluent state is touched, so several trackers (a parent and its children, or stages
    in KFP subprocesses) coexist in one process.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id: str | None = run_id
        self.client = mlflow_client(tracking_uri)

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log params (a mapping, or a config dataclass flattened to dotted keys).

        Raises:
            TrackingError: MLflow refused them, e.g. a key logged before with another value.
        """
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _clean_params(params).items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            with self._refused("params"):
                self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics in batches at ``step`` (MLflow's step 0 when None)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step or 0)) for k, v in _finite_metrics(metrics).items()]
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            with self._refused("metrics"):
                self.client.log_batch(self.run_id, metrics=chunk)

    def log_dataset(
        self,
        name: str,
        path_or_uri: str,
        fingerprint: str,
        context: str,
        num_rows: int | None = None,
    ) -> None:
        """Log a dataset input: its source, a digest from ``fingerprint``, and its row count.

        The full fingerprint and the row count go into the dataset profile, which the MLflow UI
        shows next to the input; the digest (at most 36 characters in MLflow) is its prefix.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_type, source = _dataset_source(path_or_uri)
        profile = {"sha256": fingerprint, "num_rows": num_rows}
        dataset = Dataset(
            name=name,
            digest=fingerprint[:_MAX_DIGEST_LENGTH],
            source_type=source_type,
            source=source,
            profile=json.dumps(profile),
        )
        tags = [InputTag(_DATASET_CONTEXT_TAG, context)]
        with self._refused(f"dataset {name}"):
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder (kept under its own name), below ``artifact_path``.

        Raises:
            StorageError: ``local_path`` does not exist.
        """
        path = _existing(local_path)
        with self._refused(f"artifact {path}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Store ``data`` (secrets redacted) as the JSON artifact ``name``."""
        with self._refused(f"artifact {name}"):
            self.client.log_text(self.run_id, _dump_json(data), _json_name(name))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (secrets redacted, long values truncated)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in _clean_tags(tags).items()]
        for chunk in _chunks(items, _MAX_PARAMS_TAGS_PER_BATCH):
            with self._refused("tags"):
                self.client.log_batch(self.run_id, tags=chunk)

    @contextmanager
    def _refused(self, what: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as err:
            message = _scrub(_first_line(err.message))
            raise TrackingError(
                f"MLflow at {display_uri(self.tracking_uri)} refused {what} for run "
                f"{self.run_id}: {message}"
            ) from None


def start_pipeline_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create the parent run of a pipeline run and leave it running.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///path/mlflow.db`` or ``http://host:port``).
        experiment: Experiment name; created when missing.
        run_name: Display name of the run (MLflow invents one when None).
        tags: Extra tags, e.g. the KFP run id and pipeline name (secrets redacted).

    Returns:
        The run id, to pass to each stage as its parent and to :func:`end_pipeline_run`.
    """
    client = mlflow_client(tracking_uri)
    experiment_id = ensure_experiment(client, tracking_uri, experiment)
    run_tags = {STAGE_TAG: "pipeline", VERSION_TAG: __version__, **(tags or {})}
    run = create_run(client, tracking_uri, experiment_id, run_name, run_tags)
    logger.info("MLflow pipeline run %s in experiment %s", run.info.run_id, experiment)
    return run.info.run_id


def end_pipeline_run(tracking_uri: str, run_id: str, status: RunStatus = "FINISHED") -> None:
    """End the parent run with ``status`` ("FINISHED", "FAILED" or "KILLED").

    Raises:
        ValueError: ``status`` is not one of those.
        TrackingError: MLflow refused, e.g. the run does not exist.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    tracker = MlflowTracker(tracking_uri, run_id)
    with tracker._refused("ending the run"):
        tracker.client.set_terminated(run_id, status)


KFP_RUN_TAG = "alignpipe.kfp_run_id"
PIPELINE_TAG = "alignpipe.pipeline"


def resolve_tracking_uri(tracking_uri: str | None) -> str | None:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else None (log nowhere)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def require_tracking_uri(tracking_uri: str | None) -> str:
    """Like :func:`resolve_tracking_uri`, for steps that cannot work without MLflow."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        raise TrackingError("this step needs MLflow; set MLFLOW_TRACKING_URI or tracking_uri")
    return uri


def open_pipeline_run(
    tracking_uri: str | None, experiment: str, pipeline: str, kfp_run_id: str
) -> str:
    """Check the connection and open a pipeline's parent run, tagged with the KFP run id.

    Returns an empty string when no tracking URI is configured, so that the stages log nowhere.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        logger.warning("no MLflow tracking URI (set MLFLOW_TRACKING_URI); not tracking this run")
        return ""
    check_connection(uri)
    tags = {PIPELINE_TAG: pipeline, KFP_RUN_TAG: kfp_run_id}
    return start_pipeline_run(uri, experiment, f"{pipeline}-{kfp_run_id}", tags)


def close_pipeline_run(
    tracking_uri: str | None, kfp_run_id: str, status: RunStatus, error: str | None = None
) -> None:
    """End the parent run opened for ``kfp_run_id`` (found by its tag) with ``status``."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        return
    client = mlflow_client(uri)
    runs = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'",
    )
    parents = [r for r in runs if r.data.tags.get(STAGE_TAG) == "pipeline"]
    if not parents:
        raise TrackingError(f"no MLflow parent run is tagged {KFP_RUN_TAG}={kfp_run_id}")
    if error and status != "FINISHED":
        MlflowTracker(uri, parents[0].info.run_id).set_tags({ERROR_TAG: _first_line(error)})
    end_pipeline_run(uri, parents[0].info.run_id, status)


@contextmanager
def stage_run(
    stage: str,
    *,
    tracking_uri: str | None,
    experiment: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """Open a run for one stage and yield its tracker.

    The run ends FINISHED when the block completes, FAILED when it raises (the exception
    propagates, and its first line is kept in the ``alignpipe.error`` tag), KILLED on an interrupt.

    Args:
        stage: Stage name; the run's name and its ``alignpipe.stage`` tag.
        tracking_uri: MLflow tracking URI, or None to log nowhere (a :class:`NullTracker`).
        experiment: Experiment name, used when there is no parent; a child run always goes to
            its parent's experiment, where the MLflow UI nests it.
        parent_run_id: Run id from :func:`start_pipeline_run`, or None for a standalone run.
        tags: Extra tags (secrets redacted).

    Raises:
        TrackingError: MLflow cannot be reached, or the parent run does not exist.
    """
    run_tags = {STAGE_TAG: stage, VERSION_TAG: __version__, **(tags or {})}
    if tracking_uri is None:
        null = NullTracker()
        null.set_tags(run_tags)
        yield null
        return

    client = mlflow_client(tracking_uri)
    if parent_run_id is None:
        experiment_id = ensure_experiment(client, tracking_uri, experiment)
    else:
        experiment_id = _parent_experiment(client, tracking_uri, parent_run_id)
        run_tags[PARENT_TAG] = parent_run_id
    run = create_run(client, tracking_uri, experiment_id, stage, run_tags)
    tracker = MlflowTracker(tracking_uri, run.info.run_id)
    logger.info("MLflow run %s for stage %s", run.info.run_id, stage)

    status: RunStatus = "FINISHED"
    try:
        yield tracker
    except Exception as err:
        status = "FAILED"
        _record_failure(tracker, err)
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        _terminate(tracker, status)


def fingerprint_file(path: str | Path) -> str:
    """Return the sha256 hex digest of a file, or of a folder's files in sorted order.

    A folder's digest covers each file's relative path and bytes, so renaming a file changes it.

    Raises:
        StorageError: ``path`` does not exist.
    """
    root = _existing(path)
    digest = hashlib.sha256()
    if root.is_file():
        _hash_into(digest, root)
        return digest.hexdigest()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        _hash_into(digest, file)
        digest.update(b"\0")
    return digest.hexdigest()


def check_connection(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast when the tracking backend cannot be used.

    For an HTTP server, a ``/health`` probe with ``timeout`` seconds runs first, so an absent
    server fails in seconds rather than after MLflow's retries; then one API call checks that
    the server answers as MLflow and accepts the credentials.

    Raises:
        TrackingError: The backend cannot be reached or refused the request.
    """
    from mlflow.exceptions import MlflowException

    shown = display_uri(tracking_uri)
    unreachable = f"cannot reach MLflow at {shown} (start the server or set MLFLOW_TRACKING_URI)"
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # an answer, even an error status, means a server is there; the API call judges
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(unreachable) from err
    try:
        mlflow_client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as err:
        raise TrackingError(f"{unreachable}: {_scrub(_first_line(err.message))}") from None


# -- sanitizing values ---------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """Replace the values of credential env vars wherever they appear in ``text``."""
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name)
        if not secret:
            continue
        if text == secret:
            return REDACTED
        if len(secret) >= _MIN_SCRUB_SUBSTRING and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _truncate(key: str, value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    logger.warning("value of %s has %d characters; truncated to %d", key, len(value), limit)
    return value[: limit - len(TRUNCATED)] + TRUNCATED


def _clean_value(key: str, value: Any, limit: int) -> str:
    text = "" if value is None else str(value)
    if is_secret_key(key) and text not in ("", REDACTED):
        return REDACTED
    return _truncate(key, _scrub(text), limit)


def _clean_params(params: Mapping[str, Any] | Any) -> dict[str, str]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = flatten(params, redact=True)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping or a config dataclass, got {type(params)}")
    return {str(k): _clean_value(str(k), v, MAX_PARAM_LENGTH) for k, v in params.items()}


def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _clean_value(str(k), v, MAX_TAG_LENGTH) for k, v in tags.items()}


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    kept = {}
    for key, value in metrics.items():
        number = float(value)
        if math.isfinite(number):
            kept[key] = number
        else:
            logger.warning("metric %s is %s; not logged", key, number)
    return kept


def _redact_tree(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {str(k): _redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_tree(v, key) for v in value]
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _scrub(value)
    return value


def _dump_json(data: Mapping[str, Any]) -> str:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    # default=str: paths and other plain objects in a report should not fail a stage.
    return json.dumps(_redact_tree(data), indent=2, default=str)


def _json_name(name: str) -> str:
    return name if name.endswith(".json") else f"{name}.json"


def display_uri(uri: str) -> str:
    """The URI without any password in its user-info part, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _first_line(text: str) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "no detail given"


# -- MLflow plumbing -----------------------------------------------------------------------------


@lru_cache(maxsize=8)
def mlflow_client(tracking_uri: str) -> MlflowClient:
    """One client per URI and process: opening a SQLite store costs about a second."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    db_path = _sqlite_path(tracking_uri)
    if db_path is not None:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"cannot create the folder of the MLflow database {db_path} ({err.strerror}); "
                "point the sqlite:/// tracking URI at a writable path"
            ) from None
    return MlflowClient(tracking_uri=tracking_uri)


@lru_cache(maxsize=1)
def _quiet_mlflow() -> None:
    """Keep MLflow's INFO chatter (database migrations, run links) out of stage logs."""
    import mlflow  # noqa: F401  (mlflow configures its loggers on import; adjust them after)

    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    # sqlite:////abs/path has an absolute path after the three slashes; sqlite:///rel is relative
    return Path(path).resolve() if path and path != ":memory:" else None


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts when the store has no server to decide.

    With a SQLite store, mlflow 3.17 puts artifacts in ``./mlruns`` of whatever process creates
    the experiment; we put them next to the database instead, so they are found again.
    """
    db_path = _sqlite_path(tracking_uri)
    if db_path is not None:
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
        return (db_path.parent / "mlartifacts" / folder).as_uri()
    scheme = urllib.parse.urlparse(tracking_uri).scheme.split("+", 1)[0]
    if scheme in ("postgresql", "mysql", "mssql"):
        logger.warning(
            "experiment %s on a database store without a server: its artifacts go to ./mlruns "
            "under the current folder; use an MLflow server URI to keep them in one place",
            experiment,
        )
    return None


def ensure_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(name)
        if found is None:
            location = _default_artifact_location(tracking_uri, name)
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as err:
                # Another stage process created it between our lookup and our create.
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(name)
    except MlflowException as err:
        raise backend_error(tracking_uri, err) from None
    if found is None:
        raise TrackingError(f"experiment {name} vanished from MLflow while being created; retry")
    if found.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name} is deleted in MLflow at {display_uri(tracking_uri)}; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or pick another"
        )
    return found.experiment_id


def _parent_experiment(client: MlflowClient, tracking_uri: str, parent_run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(parent_run_id).info.experiment_id
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(
                f"parent run {parent_run_id} does not exist in MLflow at "
                f"{display_uri(tracking_uri)}; pass the run id that start_pipeline_run returned"
            ) from None
        raise backend_error(tracking_uri, err) from None


def create_run(
    client: MlflowClient,
    tracking_uri: str,
    experiment_id: str,
    run_name: str | None,
    tags: Mapping[str, Any],
) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_run(experiment_id, run_name=run_name, tags=_clean_tags(tags))
    except MlflowException as err:
        raise backend_error(tracking_uri, err) from None


def backend_error(tracking_uri: str, err: Any) -> TrackingError:
    """A TrackingError for a failed MLflow call, with the URI's password left out."""
    return TrackingError(
        f"MLflow at {display_uri(tracking_uri)} failed: {_scrub(_first_line(err.message))} "
        "(check that the server is up and MLFLOW_TRACKING_URI points at it)"
    )


def _record_failure(tracker: MlflowTracker, err: BaseException) -> None:
    from mlflow.exceptions import MlflowException

    message = f"{type(err).__name__}: {_first_line(str(err))}"
    try:
        tracker.set_tags({ERROR_TAG: message})
    except (TrackingError, MlflowException) as tag_err:
        # The stage's own error matters more; do not replace it with the tracking one.
        logger.warning("could not record the failure on run %s: %s", tracker.run_id, tag_err)


def _terminate(tracker: MlflowTracker, status: RunStatus) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.set_terminated(tracker.run_id, status)
    except MlflowException as err:
        logger.warning("could not end MLflow run %s as %s: %s", tracker.run_id, status, err)


def _dataset_source(path_or_uri: str) -> tuple[str, str]:
    """Source type and JSON as mlflow's own artifact sources write them (local, s3, ...)."""
    text = str(path_or_uri)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        return scheme, json.dumps({"uri": _scrub(text)})
    return "local", json.dumps({"uri": str(Path(text).resolve())})


def _existing(path: str | Path) -> Path:
    resolved = Path(path)
    if not resolved.exists():
        raise StorageError(f"{resolved} does not exist; write it before logging or fingerprinting")
    return resolved


def _hash_into(digest: Any, file: Path) -> None:
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = [
    "MAX_PARAM_LENGTH",
    "MAX_TAG_LENGTH",
    "REDACTED",
    "SECRET_ENV_VARS",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "check_connection",
    "end_pipeline_run",
    "fingerprint_file",
    "stage_run",
    "start_pipeline_run",
]
