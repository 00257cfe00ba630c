"""Read and write files and folders at local paths and ``s3://`` URIs.

Every stage reads its inputs and writes its outputs through this module, so a path in a config can
be a folder on a laptop or a prefix in an S3 bucket (AWS, SeaweedFS, MinIO). Downloads are checked
against a checksum, transfers survive a briefly unreachable server, and every failure is a
:class:`~alignpipe.errors.StorageError` whose one-line message names the object and the fix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from alignpipe.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

S3_SCHEME = "s3://"

# Attempts per S3 request, made by botocore itself (standard retry mode: exponential backoff with
# jitter). AWS_MAX_ATTEMPTS and AWS_RETRY_MODE override these, as they do for the AWS CLI.
MAX_ATTEMPTS = 5
RETRY_MODE = "standard"

# Attempts per whole-object transfer on top of botocore's, for connection errors only: a SeaweedFS
# or MinIO restart takes longer than botocore's retries last, and a stage should outlive it.
TRANSFER_ATTEMPTS = 3
TRANSFER_BACKOFF_S = 2.0

# Files above this size go up in parts (boto3's managed transfer); parts are at least 5 MiB on S3.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

# The user-metadata key (``x-amz-meta-sha256``) that holds the hex SHA-256 of an uploaded object.
SHA256_METADATA = "sha256"

# Environment variables the client depends on: a change to any of them builds a new client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)

# Errors where the bytes never arrived (or arrived cut short): worth another whole attempt.
_CONNECTION_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    RetriesExceededError,
)

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_DENIED_CODES = {"403", "AccessDenied", "AllAccessDisabled", "Forbidden"}
_BAD_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}

_client_lock = threading.Lock()
_client_cache: tuple[str, Any] | None = None


# URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Tell whether ``uri`` is an ``s3://`` URI rather than a local path.

    Args:
        uri: A local path or a URI.

    Returns:
        True for ``s3://bucket/...``.
    """
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """Split an ``s3://`` URI into bucket and key.

    Args:
        uri: ``s3://bucket`` or ``s3://bucket/key/or/prefix``.

    Returns:
        ``(bucket, key)``; the key is ``""`` for the bucket root and keeps a trailing ``/``.

    Raises:
        StorageError: The URI is not ``s3://`` or names no bucket.
    """
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI (write it as s3://bucket/key)")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI (write it as s3://bucket/key)")
    return bucket, key


def _join_s3(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}" if key else f"{S3_SCHEME}{bucket}"


def _folder_prefix(key: str) -> str:
    """The listing prefix of a folder: ``data`` must not match ``data2/x``."""
    return key.rstrip("/") + "/" if key.strip("/") else ""


# Client


def s3_client() -> Any:
    """Return a boto3 S3 client configured from the standard AWS environment variables.

    boto3 reads the endpoint (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``), credentials
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``) and
    CA bundle itself; the region comes from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``. Requests
    retry in botocore's standard mode. With a custom endpoint, buckets are addressed path-style
    (``http://host/bucket/key``), which SeaweedFS and MinIO need; on AWS boto3 picks the style.

    The client is cached per process and rebuilt when any of those variables changes.

    Returns:
        A ``botocore`` S3 client (thread-safe).

    Raises:
        StorageError: The AWS settings in the environment are invalid.
    """
    global _client_cache
    fingerprint = hashlib.sha256(
        "\0".join(f"{name}={os.environ.get(name, '')}" for name in _CLIENT_ENV).encode()
    ).hexdigest()
    with _client_lock:
        if _client_cache is None or _client_cache[0] != fingerprint:
            _client_cache = (fingerprint, _build_client())
        return _client_cache[1]


def _build_client() -> Any:
    raw_attempts = os.environ.get("AWS_MAX_ATTEMPTS", str(MAX_ATTEMPTS))
    if not raw_attempts.isdigit() or int(raw_attempts) < 1:
        raise StorageError(
            f"AWS_MAX_ATTEMPTS={raw_attempts!r} is not a positive integer (set it to e.g. 5)"
        )
    custom_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", RETRY_MODE),
            "total_max_attempts": int(raw_attempts),
        },
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        connect_timeout=10,
        read_timeout=60,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    try:
        # A session of its own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session(region_name=region)
        client = session.client("s3", config=config)
    except (BotoCoreError, ValueError) as err:
        raise StorageError(
            f"cannot build an S3 client: {_one_line(err)} "
            "(check AWS_PROFILE, AWS_ENDPOINT_URL and AWS_REGION)"
        ) from err
    logger.debug("S3 client for endpoint %s", _safe_endpoint(client))
    return client


def _safe_endpoint(client: Any) -> str:
    """The client's endpoint URL without any ``user:password@`` part."""
    parts = urlsplit(client.meta.endpoint_url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _transfer_config() -> TransferConfig:
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE
    )


# Errors


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _bucket_missing(client: Any, bucket: str) -> bool:
    """Ask the server whether ``bucket`` exists; False when it cannot tell."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        return err.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES | _NO_BUCKET_CODES
    except BotoCoreError as err:
        logger.debug("cannot check whether bucket %s exists: %s", bucket, type(err).__name__)
    return False


def _unwrap(err: BaseException) -> BaseException:
    """The botocore error underneath boto3's transfer wrappers."""
    if isinstance(err, RetriesExceededError) and err.last_exception is not None:
        return err.last_exception
    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        return err.__context__
    return err


def _describe(err: BaseException, uri: str, client: Any) -> str:
    """A one-line message for an S3 failure on ``uri``, naming the fix and no secret."""
    cause = _unwrap(err)
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(cause, _CONNECTION_ERRORS):
        return (
            f"{uri}: cannot reach S3 endpoint {_safe_endpoint(client)} "
            "(set AWS_ENDPOINT_URL or check the server)"
        )
    if isinstance(cause, ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code", ""))
        bucket, _ = split_s3(uri)
        if code in _NO_BUCKET_CODES or (
            # A missing bucket also shows as 404 on HEAD and, on SeaweedFS, as AccessDenied on PUT.
            code in _NOT_FOUND_CODES | _DENIED_CODES and _bucket_missing(client, bucket)
        ):
            return f"{uri}: bucket {bucket!r} does not exist (create it or fix the URI)"
        if code in _NOT_FOUND_CODES:
            return f"{uri}: no such key (check the path)"
        if code in _DENIED_CODES:
            return (
                f"{uri}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "and the bucket policy)"
            )
        if code in _BAD_CREDENTIAL_CODES:
            return (
                f"{uri}: the server rejected the credentials ({code}) "
                "(check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN)"
            )
        if code == "InvalidBucketName":
            return (
                f"{uri}: invalid bucket name {bucket!r} (fix the URI: 3-63 lowercase letters, "
                "digits, dots and hyphens)"
            )
        message = _one_line(error.get("Message", "")) or "no message"
        return f"{uri}: S3 request failed with {code or 'an error'}: {message} (check the server)"
    return f"{uri}: S3 request failed: {_one_line(cause)} (check the server and the URI)"


@contextmanager
def _s3_errors(uri: str, client: Any) -> Iterator[None]:
    """Turn boto3/botocore failures inside the block into StorageError."""
    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise StorageError(_describe(err, uri, client)) from err


@contextmanager
def _local_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn OS errors on local files inside the block into StorageError."""
    try:
        yield
    except OSError as err:
        where = err.filename if err.filename is not None else path
        if isinstance(err, FileNotFoundError):
            fix = "no such file or directory (check the path)"
        elif isinstance(err, PermissionError):
            fix = "permission denied (check the permissions or choose another path)"
        elif isinstance(err, IsADirectoryError):
            fix = "is a directory, expected a file (pass a file path)"
        elif isinstance(err, (NotADirectoryError, FileExistsError)):
            # FileExistsError comes from mkdir(exist_ok=True): a file sits where a folder goes.
            fix = "a part of the path is a file, not a directory (fix the path)"
        else:
            fix = f"{err.strerror or _one_line(err)} (check the path and the free disk space)"
        raise StorageError(f"{where}: {fix}") from err


def _with_retries(uri: str, action: str, fn: Callable[[], T]) -> T:
    """Run a whole-object transfer again when the connection fails, a bounded number of times."""
    attempt = 1
    while True:
        try:
            return fn()
        except _CONNECTION_ERRORS as err:
            if attempt >= TRANSFER_ATTEMPTS:
                raise
            delay = TRANSFER_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning(
                "%s: %s failed (%s), attempt %d of %d; retrying in %.1f s",
                uri,
                action,
                type(_unwrap(err)).__name__,
                attempt,
                TRANSFER_ATTEMPTS,
                delay,
            )
            time.sleep(delay)
            attempt += 1


# Checksums


def _file_digests(path: Path) -> tuple[str, str]:
    """Hex SHA-256 and MD5 of a file, read in chunks."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with _local_errors(path), path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def _verify(uri: str, sha256_hex: str, md5_hex: str, response: dict[str, Any]) -> str | None:
    """Check received content against a HEAD/GET response; return the check that was made.

    The ``sha256`` user metadata written by :func:`upload` is trusted first. Without it the ETag is
    used when it is a plain MD5: not for multipart uploads (``<md5>-<parts>``) and not under
    SSE-KMS or SSE-C, where the ETag is not the MD5 of the content.

    Raises:
        StorageError: The content does not match.
    """
    fix = "the object is corrupt or changed during the download; download again or re-upload it"
    expected = (response.get("Metadata") or {}).get(SHA256_METADATA)
    if expected:
        if expected.lower() != sha256_hex:
            raise StorageError(
                f"{uri}: checksum mismatch, sha256 in metadata {expected[:16]}... but received "
                f"{sha256_hex[:16]}... ({fix})"
            )
        return "sha256"
    etag = str(response.get("ETag", "")).strip('"').lower()
    encrypted = str(response.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        response.get("SSECustomerAlgorithm")
    )
    if re.fullmatch(r"[0-9a-f]{32}", etag) and not encrypted:
        if etag != md5_hex:
            raise StorageError(
                f"{uri}: checksum mismatch, ETag (MD5) {etag[:16]}... but received "
                f"{md5_hex[:16]}... ({fix})"
            )
        return "md5"
    logger.debug("%s: no checksum to verify against (ETag %s, no sha256 metadata)", uri, etag)
    return None


# Single objects


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """HEAD an object; None when there is no object at exactly that key."""
    if not key or key.endswith("/"):
        return None
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
            return None
        raise


def _list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under ``prefix``, without folder markers (keys ending in ``/``)."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(key for key in keys if not key.endswith("/"))


def _download_object(
    client: Any, bucket: str, key: str, target: Path, head: dict[str, Any] | None = None
) -> None:
    uri = _join_s3(bucket, key)
    with _s3_errors(uri, client):
        if head is None:
            head = client.head_object(Bucket=bucket, Key=key)
    with _local_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    with _local_errors(target), _s3_errors(uri, client):
        _with_retries(
            uri,
            "download",
            lambda: client.download_file(bucket, key, str(target), Config=_transfer_config()),
        )
    sha256_hex, md5_hex = _file_digests(target)
    try:
        _verify(uri, sha256_hex, md5_hex, head)
    except StorageError:
        target.unlink()
        raise


def _upload_file(client: Any, path: Path, bucket: str, key: str) -> None:
    uri = _join_s3(bucket, key)
    sha256_hex, _ = _file_digests(path)
    extra = {"Metadata": {SHA256_METADATA: sha256_hex}}
    with _local_errors(path), _s3_errors(uri, client):
        _with_retries(
            uri,
            "upload",
            lambda: client.upload_file(
                str(path), bucket, key, ExtraArgs=extra, Config=_transfer_config()
            ),
        )
    logger.debug("uploaded %s to %s", path, uri)


def _relative_path(prefix: str, key: str, uri: str) -> PurePosixPath:
    """The path of ``key`` below ``prefix``, refusing keys that would leave the folder."""
    relative = PurePosixPath(key[len(prefix) :])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise StorageError(
            f"{uri}: the key would be written outside the destination folder "
            "(rename the object; '..' and leading '/' are not allowed)"
        )
    return relative


# Public API


def exists(uri: str) -> bool:
    """Tell whether a file, or a folder or prefix with at least one file, is at ``uri``.

    Args:
        uri: A local path or an ``s3://`` URI.

    Returns:
        True for an existing local file or directory, an S3 object, or an S3 prefix (treated as a
        folder: ``s3://b/data`` covers ``data/x`` but not ``data2/x``) with at least one object.

    Raises:
        StorageError: The bucket does not exist or the server cannot be reached.
    """
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(uri, client):
        if _head(client, bucket, key) is not None:
            return True
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=_folder_prefix(key)):
            if any(not item["Key"].endswith("/") for item in page.get("Contents", [])):
                return True
    return False


def read_bytes(uri: str) -> bytes:
    """Read a whole file or object, verifying an S3 object against its checksum.

    Args:
        uri: A local file path or an ``s3://bucket/key`` URI.

    Returns:
        The content.

    Raises:
        StorageError: Missing file, key or bucket, unreachable server, or checksum mismatch.
    """
    if not is_s3(uri):
        with _local_errors(uri):
            return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a bucket or folder, not an object (add the object key)")
    client = s3_client()

    def fetch() -> tuple[dict[str, Any], bytes]:
        response = client.get_object(Bucket=bucket, Key=key)
        return response, response["Body"].read()

    with _s3_errors(uri, client):
        response, data = _with_retries(uri, "read", fetch)
    _verify(
        uri,
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data, usedforsecurity=False).hexdigest(),
        response,
    )
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a file or object, replacing it; local parent folders are created.

    An S3 object gets its SHA-256 in the ``sha256`` user metadata, so reads can verify it.

    Args:
        uri: A local file path or an ``s3://bucket/key`` URI.
        data: The content.

    Raises:
        StorageError: The path cannot be written, or the bucket or server is not there.
    """
    if not is_s3(uri):
        path = Path(uri)
        with _local_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: names a bucket or folder, not an object (add the object key)")
    client = s3_client()
    metadata = {SHA256_METADATA: hashlib.sha256(data).hexdigest()}
    with _s3_errors(uri, client):
        _with_retries(
            uri,
            "write",
            lambda: client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata),
        )


def read_text(uri: str) -> str:
    """Read a UTF-8 text file or object.

    Args:
        uri: A local file path or an ``s3://bucket/key`` URI.

    Returns:
        The decoded text.

    Raises:
        StorageError: As :func:`read_bytes`, or the content is not UTF-8.
    """
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StorageError(
            f"{uri}: not UTF-8 text (invalid byte at offset {err.start}; re-encode it as UTF-8)"
        ) from err


def write_text(uri: str, text: str) -> None:
    """Write ``text`` as UTF-8 to a file or object (see :func:`write_bytes`).

    Args:
        uri: A local file path or an ``s3://bucket/key`` URI.
        text: The text.
    """
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str) -> list[str]:
    """List every file under a folder or prefix, recursively.

    Args:
        uri: A local directory or file, or an ``s3://`` prefix or object. A prefix is a folder:
            ``s3://b/data`` lists ``data/...``, not ``data2/...``.

    Returns:
        Sorted full paths or URIs of the files (``[uri]`` for a single file). S3 folder markers
        (keys ending in ``/``) are skipped. An existing empty local directory gives ``[]``.

    Raises:
        StorageError: Nothing exists at ``uri``, or the bucket or server is not there.
    """
    if not is_s3(uri):
        path = Path(uri)
        if path.is_file():
            return [str(path)]
        if not path.is_dir():
            raise StorageError(f"{uri}: no such file or directory (check the path)")
        with _local_errors(path):
            return sorted(str(item) for item in path.rglob("*") if item.is_file())
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(uri, client):
        keys = _list_keys(client, bucket, _folder_prefix(key))
        if not keys and _head(client, bucket, key) is not None:
            return [uri]
    if not keys:
        raise StorageError(f"{uri}: no such key or prefix (check the path)")
    return [_join_s3(bucket, item) for item in keys]


def list_relative(uri: str) -> list[str]:
    """List the files under a folder or prefix by their relative paths; ``[]`` when there are none.

    Unlike :func:`list_files`, an empty or missing folder is not an error: this is for places
    that start empty, such as a prefix that checkpoints accumulate under.

    Args:
        uri: A local directory or an ``s3://`` prefix (``s3://b/data`` covers ``data/...`` only).

    Returns:
        Sorted POSIX paths relative to ``uri`` (``"checkpoint-10/model.safetensors"``).

    Raises:
        StorageError: The bucket or server is not there, or the local folder cannot be read.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            return []
        with _local_errors(path):
            return sorted(
                item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file()
            )
    bucket, key = split_s3(uri)
    prefix = _folder_prefix(key)
    client = s3_client()
    with _s3_errors(uri, client):
        keys = _list_keys(client, bucket, prefix)
    return [item[len(prefix) :] for item in keys]


def delete(uri: str) -> int:
    """Delete a file, or every file under a folder or prefix; nothing there is not an error.

    Args:
        uri: A local path or an ``s3://`` URI of an object or prefix. A prefix is a folder:
            ``s3://b/data`` deletes ``data`` and ``data/...``, not ``data2/...``.

    Returns:
        How many files or objects were deleted.

    Raises:
        StorageError: The bucket or server is not there, or a file could not be deleted.
    """
    if not is_s3(uri):
        path = Path(uri)
        with _local_errors(path):
            if path.is_dir():
                count = sum(1 for item in path.rglob("*") if item.is_file())
                shutil.rmtree(path)
                return count
            if path.exists():
                path.unlink()
                return 1
        return 0
    bucket, key = split_s3(uri)
    if not key.strip("/"):
        raise StorageError(f"{uri}: refusing to empty a whole bucket (name a prefix in it)")
    client = s3_client()
    with _s3_errors(uri, client):
        keys = _list_keys(client, bucket, _folder_prefix(key))
        if _head(client, bucket, key) is not None:
            keys.append(key)
        # DeleteObjects takes at most 1000 keys per request
        for start in range(0, len(keys), 1000):
            batch = [{"Key": item} for item in keys[start : start + 1000]]
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
            failed = response.get("Errors") or []
            if failed:
                first = failed[0]
                raise StorageError(
                    f"{_join_s3(bucket, first.get('Key', ''))}: cannot delete "
                    f"({first.get('Code', 'an error')}: {first.get('Message', 'no message')}; "
                    "check the bucket policy)"
                )
    logger.debug("deleted %d objects at %s", len(keys), uri)
    return len(keys)


def download(uri: str, dest: str | os.PathLike[str]) -> Path:
    """Fetch a file, or every file under a folder or prefix, to a local path.

    A file goes to ``dest`` (or into it, when ``dest`` is an existing directory). A folder's
    files go under ``dest`` at their relative paths, merging with what is there. Each S3 object
    is checked against its checksum.

    Args:
        uri: A local path or an ``s3://`` URI of an object or prefix.
        dest: The local destination.

    Returns:
        The local path of the file or folder written.

    Raises:
        StorageError: Nothing at ``uri``, unreachable server, checksum mismatch, or a local write
            failed.
    """
    dest = Path(dest)
    if not is_s3(uri):
        return _copy_local(Path(uri), dest)
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(uri, client):
        head = _head(client, bucket, key)
    if head is not None:
        target = dest / PurePosixPath(key).name if dest.is_dir() else dest
        _download_object(client, bucket, key, target, head)
        return target
    prefix = _folder_prefix(key)
    with _s3_errors(uri, client):
        keys = _list_keys(client, bucket, prefix)
    if not keys:
        raise StorageError(f"{uri}: no such key or prefix (check the path)")
    for item in keys:
        relative = _relative_path(prefix, item, _join_s3(bucket, item))
        _download_object(client, bucket, item, dest.joinpath(*relative.parts))
    logger.info("downloaded %d files from %s to %s", len(keys), uri, dest)
    return dest


def upload(src: str | os.PathLike[str], uri: str) -> None:
    """Send a local file, or every file under a local folder, to ``uri``.

    A file becomes the object ``uri`` (or ``uri`` + file name, when ``uri`` ends with ``/``). A
    folder's files become objects under the prefix ``uri`` at their relative paths; objects
    already under the prefix are kept. Each object records its SHA-256 in its metadata. A local
    ``uri`` is a plain copy.

    Args:
        src: The local file or folder.
        uri: The destination ``s3://`` URI (or local path).

    Raises:
        StorageError: ``src`` is missing, or the bucket or server is not there.
    """
    src = Path(src)
    if not is_s3(uri):
        _copy_local(src, Path(uri))
        return
    bucket, key = split_s3(uri)
    client = s3_client()
    if src.is_file():
        if not key or key.endswith("/"):
            key += src.name
        _upload_file(client, src, bucket, key)
        return
    if not src.is_dir():
        raise StorageError(f"{src}: no such file or directory (check the path)")
    with _local_errors(src):
        files = sorted(item for item in src.rglob("*") if item.is_file())
    if not files:
        # S3 has no empty folders: say so rather than pretend something was stored.
        logger.warning("%s: empty folder, nothing uploaded to %s", src, uri)
    prefix = _folder_prefix(key)
    for item in files:
        _upload_file(client, item, bucket, prefix + item.relative_to(src).as_posix())
    logger.info("uploaded %d files from %s to %s", len(files), src, uri)


def copy(src: str, dst: str) -> None:
    """Copy a file or folder between any two of local paths and ``s3://`` URIs.

    Files and folders follow :func:`download` and :func:`upload`: a folder's files land under
    ``dst`` at their relative paths. S3 to S3 goes through a local temporary folder, so the
    content is verified on the way and the copy carries a fresh ``sha256``.

    Args:
        src: Source path or URI.
        dst: Destination path or URI.

    Raises:
        StorageError: As :func:`download` and :func:`upload`.
    """
    if is_s3(src) and is_s3(dst):
        _, key = split_s3(src)
        with tempfile.TemporaryDirectory(prefix="alignpipe-copy-") as tmp:
            staged = download(src, Path(tmp) / (PurePosixPath(key).name or "root"))
            upload(staged, dst)
    elif is_s3(src):
        download(src, dst)
    else:
        upload(src, dst)


def _copy_local(src: Path, dest: Path) -> Path:
    with _local_errors(src):
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
            return dest
        target = dest / src.name if dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        return target


@contextmanager
def local_path(uri: str) -> Iterator[Path]:
    """Give a local path to read a file or folder from, wherever it lives.

    A local path is yielded as is. An S3 object or prefix is downloaded (verified) into a
    temporary folder that is removed when the block exits.

    Args:
        uri: A local path or an ``s3://`` URI of an object or prefix.

    Yields:
        The local path of the file or folder.

    Raises:
        StorageError: Nothing at ``uri``, or the download failed.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise StorageError(f"{uri}: no such file or directory (check the path)")
        yield path
        return
    bucket, key = split_s3(uri)
    with tempfile.TemporaryDirectory(prefix="alignpipe-in-") as tmp:
        yield download(uri, Path(tmp) / (PurePosixPath(key).name or bucket))


@contextmanager
def output_path(uri: str) -> Iterator[Path]:
    """Give a local path to write a file or folder to, stored at ``uri`` when the block ends.

    For a local ``uri`` the path itself is yielded, with its parent folders created. For S3 a
    path in a temporary folder is yielded (nothing is created there); write a file or a folder at
    it. When the block exits without an exception it is uploaded to ``uri``; after an exception
    nothing is uploaded. The temporary folder is removed either way.

    Args:
        uri: A local path or an ``s3://`` URI.

    Yields:
        The local path to write.

    Raises:
        StorageError: Nothing was written at the path, or the upload failed.
    """
    if not is_s3(uri):
        path = Path(uri)
        with _local_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        yield path
        return
    bucket, key = split_s3(uri)
    with tempfile.TemporaryDirectory(prefix="alignpipe-out-") as tmp:
        path = Path(tmp) / (PurePosixPath(key).name or bucket)
        yield path
        if not path.exists():
            raise StorageError(
                f"{uri}: nothing was written to the local output path {path} "
                "(write a file or folder there before the block ends)"
            )
        upload(path, uri)
