"""Tests of alignpipe.storage: local paths without a server, s3:// against a real SeaweedFS."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from alignpipe import storage
from alignpipe.errors import StorageError

TREE = {
    "a.txt": b"alpha\n",
    "sub/b.json": b'{"b": 1}\n',
    "sub/deeper/c.bin": bytes([0, 255, 1, 254]),
}


def write_tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def storage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "alignpipe.storage" and record.levelno == logging.WARNING
    ]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """AWS settings that point at a closed port, with one attempt per request and no backoff."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-for-tests")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-that-must-not-leak")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setattr(storage, "TRANSFER_BACKOFF_S", 0.0)
    return "s3://bkt"


# URIs and client


def test_split_s3_and_is_s3() -> None:
    assert storage.split_s3("s3://bkt/a/b.json") == ("bkt", "a/b.json")
    assert storage.split_s3("s3://bkt") == ("bkt", "")
    assert storage.split_s3("s3://bkt/models/") == ("bkt", "models/")
    assert storage.is_s3("s3://bkt/x")
    assert not storage.is_s3("/tmp/s3://x")
    assert not storage.is_s3(Path("s3:/bkt"))
    with pytest.raises(StorageError, match=r"^s3:///key: no bucket in the URI"):
        storage.split_s3("s3:///key")
    with pytest.raises(StorageError, match="not an s3:// URI"):
        storage.split_s3("gs://bkt/key")


def test_client_is_cached_until_the_environment_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")
    first = storage.s3_client()
    assert storage.s3_client() is first
    assert first.meta.endpoint_url == "http://127.0.0.1:9001"
    assert first.meta.region_name == "eu-west-1"
    assert first.meta.config.s3["addressing_style"] == "path"
    assert first.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9002")
    second = storage.s3_client()
    assert second is not first
    assert second.meta.endpoint_url == "http://127.0.0.1:9002"

    # On AWS itself boto3 chooses the addressing style.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.s3_client().meta.config.s3["addressing_style"] == "auto"

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS='many' is not a positive integer"):
        storage.s3_client()


# Local paths


def test_local_bytes_and_text_round_trip_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "file.bin"
    storage.write_bytes(str(target), b"\x00\x01payload")
    assert target.read_bytes() == b"\x00\x01payload"
    assert storage.read_bytes(str(target)) == b"\x00\x01payload"

    storage.write_text(str(tmp_path / "t.txt"), "héllo ✓")
    assert (tmp_path / "t.txt").read_bytes() == "héllo ✓".encode()
    assert storage.read_text(str(tmp_path / "t.txt")) == "héllo ✓"
    assert storage.exists(str(target))
    assert not storage.exists(str(tmp_path / "missing"))


def test_local_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(StorageError) as info:
        storage.read_bytes(str(missing))
    assert str(info.value) == f"{missing}: no such file or directory (check the path)"

    (tmp_path / "plain").write_text("a file")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        storage.write_bytes(str(tmp_path / "plain" / "x.bin"), b"x")

    with pytest.raises(StorageError, match="is a directory, expected a file"):
        storage.read_bytes(str(tmp_path))

    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(StorageError, match=r"not UTF-8 text \(invalid byte at offset 3"):
        storage.read_text(str(tmp_path / "latin1.txt"))

    with pytest.raises(StorageError, match="no such file or directory"):
        storage.list_files(str(missing))
    with (
        pytest.raises(StorageError, match="no such file or directory"),
        storage.local_path(str(missing)),
    ):
        pass


def test_local_list_files_is_recursive_and_sorted(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tree")
    (root / "empty").mkdir()
    assert storage.list_files(str(root)) == [
        str(root / "a.txt"),
        str(root / "sub" / "b.json"),
        str(root / "sub" / "deeper" / "c.bin"),
    ]
    assert storage.list_files(str(root / "a.txt")) == [str(root / "a.txt")]
    assert storage.list_files(str(root / "empty")) == []


def test_local_copy_download_and_context_managers(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "tree")

    storage.copy(str(root), str(tmp_path / "copied"))
    assert read_tree(tmp_path / "copied") == TREE
    (tmp_path / "into").mkdir()
    assert storage.download(str(root / "a.txt"), tmp_path / "into") == tmp_path / "into" / "a.txt"
    assert (tmp_path / "into" / "a.txt").read_bytes() == b"alpha\n"

    with storage.local_path(str(root)) as path:
        assert path == root

    with storage.output_path(str(tmp_path / "out" / "nested" / "f.txt")) as path:
        assert path.parent.is_dir()
        path.write_text("written")
    assert (tmp_path / "out" / "nested" / "f.txt").read_text() == "written"


# Checksums


def test_verify_prefers_sha256_and_uses_only_plain_md5_etags() -> None:
    data = b"some bytes"
    sha, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    other_md5 = hashlib.md5(b"other").hexdigest()

    assert storage._verify("s3://b/k", sha, md5, {"Metadata": {"sha256": sha}}) == "sha256"
    assert storage._verify("s3://b/k", sha, md5, {"ETag": f'"{md5}"'}) == "md5"
    with pytest.raises(StorageError, match=r"^s3://b/k: checksum mismatch, ETag \(MD5\)"):
        storage._verify("s3://b/k", sha, md5, {"ETag": f'"{other_md5}"'})
    # sha256 metadata wins over an ETag that would not match.
    response = {"Metadata": {"sha256": sha}, "ETag": f'"{other_md5}"'}
    assert storage._verify("s3://b/k", sha, md5, response) == "sha256"
    # Multipart and KMS-encrypted ETags are not an MD5 of the content: nothing to check.
    assert storage._verify("s3://b/k", sha, md5, {"ETag": f'"{other_md5}-3"'}) is None
    kms = {"ETag": f'"{other_md5}"', "ServerSideEncryption": "aws:kms"}
    assert storage._verify("s3://b/k", sha, md5, kms) is None


def test_keys_cannot_escape_the_destination_folder() -> None:
    assert storage._relative_path("run/", "run/sub/x.bin", "s3://b/run/sub/x.bin").parts == (
        "sub",
        "x.bin",
    )
    with pytest.raises(StorageError, match="outside the destination folder"):
        storage._relative_path("run/", "run/../../etc/passwd", "s3://b/run/../../etc/passwd")


# Unreachable endpoint (no server needed: the port is closed)


def test_unreachable_endpoint_retries_then_names_endpoint(
    no_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"{no_server}/a/b.json")
    assert str(info.value) == (
        "s3://bkt/a/b.json: cannot reach S3 endpoint http://127.0.0.1:1 "
        "(set AWS_ENDPOINT_URL or check the server)"
    )
    assert "secret-that-must-not-leak" not in str(info.value)
    warnings = storage_warnings(caplog)
    assert len(warnings) == storage.TRANSFER_ATTEMPTS - 1
    assert warnings[0].startswith("s3://bkt/a/b.json: read failed (EndpointConnectionError)")

    with pytest.raises(StorageError, match=r"^s3://bkt/x: cannot reach S3 endpoint"):
        storage.exists(f"{no_server}/x")


# S3 (real SeaweedFS)


@pytest.mark.integration
def test_s3_bytes_and_text_round_trip_with_checksums(s3_env: str, s3_raw) -> None:
    bucket, _ = storage.split_s3(s3_env)
    data = b"\x00binary\xffpayload"
    storage.write_bytes(f"{s3_env}/dir/blob.bin", data)
    assert storage.read_bytes(f"{s3_env}/dir/blob.bin") == data

    # What the checks rely on, as SeaweedFS really returns it: the sha256 user metadata and a
    # plain-MD5 ETag for a single-part upload.
    head = s3_raw.head_object(Bucket=bucket, Key="dir/blob.bin")
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert head["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'

    storage.write_text(f"{s3_env}/notes/t.txt", "héllo ✓\n")
    assert storage.read_text(f"{s3_env}/notes/t.txt") == "héllo ✓\n"

    # An object written by someone else, without sha256 metadata, is checked by its ETag.
    s3_raw.put_object(Bucket=bucket, Key="foreign.txt", Body=b"from elsewhere")
    assert storage.read_bytes(f"{s3_env}/foreign.txt") == b"from elsewhere"
    foreign_head = s3_raw.head_object(Bucket=bucket, Key="foreign.txt")
    sha = hashlib.sha256(b"from elsewhere").hexdigest()
    md5 = hashlib.md5(b"from elsewhere").hexdigest()
    assert storage._verify(f"{s3_env}/foreign.txt", sha, md5, foreign_head) == "md5"


@pytest.mark.integration
def test_s3_folder_round_trip_list_and_exists(s3_env: str, tmp_path: Path) -> None:
    source = write_tree(tmp_path / "source")
    storage.upload(source, f"{s3_env}/models/run1")

    expected = [
        f"{s3_env}/models/run1/a.txt",
        f"{s3_env}/models/run1/sub/b.json",
        f"{s3_env}/models/run1/sub/deeper/c.bin",
    ]
    assert storage.list_files(f"{s3_env}/models/run1") == expected
    assert storage.list_files(f"{s3_env}/models/run1/") == expected
    assert storage.list_files(f"{s3_env}/models/run1/a.txt") == [expected[0]]

    assert storage.exists(f"{s3_env}/models/run1")
    assert storage.exists(f"{s3_env}/models/run1/sub/b.json")
    # A prefix is a folder: "models/run" does not cover "models/run1/...".
    assert not storage.exists(f"{s3_env}/models/run")
    assert not storage.exists(f"{s3_env}/models/run1/nope.txt")
    with pytest.raises(StorageError, match=r"models/run: no such key or prefix \(check the path\)"):
        storage.list_files(f"{s3_env}/models/run")

    back = storage.download(f"{s3_env}/models/run1", tmp_path / "back")
    assert back == tmp_path / "back"
    assert read_tree(back) == TREE

    # A single file, into an existing folder and to a new path.
    (tmp_path / "one").mkdir()
    got = storage.download(f"{s3_env}/models/run1/sub/b.json", tmp_path / "one")
    assert got == tmp_path / "one" / "b.json"
    assert got.read_bytes() == b'{"b": 1}\n'
    got = storage.download(f"{s3_env}/models/run1/a.txt", tmp_path / "x" / "renamed.txt")
    assert got.read_bytes() == b"alpha\n"


@pytest.mark.integration
def test_s3_folder_markers_are_not_files(s3_env: str, s3_raw) -> None:
    bucket, _ = storage.split_s3(s3_env)
    s3_raw.put_object(Bucket=bucket, Key="data/empty/", Body=b"")
    s3_raw.put_object(Bucket=bucket, Key="data/x.txt", Body=b"x")
    assert storage.list_files(f"{s3_env}/data") == [f"{s3_env}/data/x.txt"]
    assert not storage.exists(f"{s3_env}/data/empty")


@pytest.mark.integration
def test_s3_multipart_file_round_trip(
    s3_env: str, s3_raw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parts of 5 MiB (the S3 minimum) so that an 11 MiB file goes up in 3 parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = bytes(range(256)) * (11 * 1024 * 4)
    (tmp_path / "big.bin").write_bytes(data)

    storage.upload(tmp_path / "big.bin", f"{s3_env}/ckpt/")
    bucket, _ = storage.split_s3(s3_env)
    head = s3_raw.head_object(Bucket=bucket, Key="ckpt/big.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()

    got = storage.download(f"{s3_env}/ckpt/big.bin", tmp_path / "big-back.bin")
    assert got.read_bytes() == data


@pytest.mark.integration
def test_s3_local_path_for_file_and_folder(s3_env: str, tmp_path: Path) -> None:
    storage.upload(write_tree(tmp_path / "source"), f"{s3_env}/ds")

    with storage.local_path(f"{s3_env}/ds/sub/b.json") as path:
        assert path.name == "b.json"
        assert path.read_bytes() == b'{"b": 1}\n'
        kept_file = path
    assert not kept_file.exists()

    with storage.local_path(f"{s3_env}/ds") as path:
        assert path.name == "ds"
        assert read_tree(path) == TREE
        kept_dir = path
    assert not kept_dir.exists()


@pytest.mark.integration
def test_s3_output_path_uploads_file_or_folder_on_success_only(s3_env: str) -> None:
    with storage.output_path(f"{s3_env}/out/report.md") as path:
        assert path.name == "report.md"
        path.write_text("# report\n")
    assert storage.read_text(f"{s3_env}/out/report.md") == "# report\n"

    with storage.output_path(f"{s3_env}/out/model") as path:
        write_tree(path)
    assert storage.list_files(f"{s3_env}/out/model") == [
        f"{s3_env}/out/model/a.txt",
        f"{s3_env}/out/model/sub/b.json",
        f"{s3_env}/out/model/sub/deeper/c.bin",
    ]

    with (
        pytest.raises(RuntimeError, match="training diverged"),
        storage.output_path(f"{s3_env}/out/failed") as path,
    ):
        write_tree(path)
        raise RuntimeError("training diverged")
    assert not storage.exists(f"{s3_env}/out/failed")

    with (
        pytest.raises(StorageError, match="nothing was written to the local output path"),
        storage.output_path(f"{s3_env}/out/forgotten"),
    ):
        pass


@pytest.mark.integration
def test_s3_copy_in_every_direction(s3_env: str, tmp_path: Path) -> None:
    write_tree(tmp_path / "source")
    storage.copy(str(tmp_path / "source"), f"{s3_env}/a")
    storage.copy(f"{s3_env}/a", f"{s3_env}/b")
    storage.copy(f"{s3_env}/b/sub/b.json", f"{s3_env}/c/renamed.json")
    storage.copy(f"{s3_env}/b", str(tmp_path / "back"))

    assert read_tree(tmp_path / "back") == TREE
    assert storage.list_files(f"{s3_env}/b") == [
        f"{s3_env}/b/a.txt",
        f"{s3_env}/b/sub/b.json",
        f"{s3_env}/b/sub/deeper/c.bin",
    ]
    assert storage.read_bytes(f"{s3_env}/c/renamed.json") == b'{"b": 1}\n'


@pytest.mark.integration
def test_s3_errors_name_bucket_key_and_fix(s3_env: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"{s3_env}/nope.json")
    assert str(info.value) == f"{s3_env}/nope.json: no such key (check the path)"

    with pytest.raises(StorageError, match=r"nope/: no such key or prefix \(check the path\)$"):
        storage.download(f"{s3_env}/nope/", tmp_path / "dl")

    missing = "s3://no-such-bucket-for-tests/a/b.json"
    expected = (
        f"{missing}: bucket 'no-such-bucket-for-tests' does not exist (create it or fix the URI)"
    )
    with pytest.raises(StorageError) as info:
        storage.read_bytes(missing)
    assert str(info.value) == expected
    # SeaweedFS answers a write into a missing bucket with AccessDenied; the message still says
    # what is wrong.
    with pytest.raises(StorageError) as info:
        storage.write_bytes(missing, b"x")
    assert str(info.value) == expected
    (tmp_path / "f.txt").write_text("f")
    with pytest.raises(StorageError) as info:
        storage.upload(tmp_path / "f.txt", missing)
    assert str(info.value) == expected
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-for-tests' does not exist"):
        storage.exists(missing)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-for-tests' does not exist"):
        storage.download(missing, tmp_path / "dl")

    with pytest.raises(StorageError, match="names a bucket or folder, not an object"):
        storage.read_bytes(f"{s3_env}/folder/")


@pytest.mark.integration
def test_s3_checksum_mismatch_is_detected(s3_env: str, s3_raw, tmp_path: Path) -> None:
    bucket, _ = storage.split_s3(s3_env)
    # The stored sha256 disagrees with the body, as it would after corruption in storage.
    s3_raw.put_object(
        Bucket=bucket,
        Key="ckpt/weights.bin",
        Body=b"the real body",
        Metadata={"sha256": hashlib.sha256(b"what was uploaded").hexdigest()},
    )
    uri = f"{s3_env}/ckpt/weights.bin"
    with pytest.raises(StorageError, match=rf"^{uri}: checksum mismatch, sha256 in metadata"):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match=rf"^{uri}: checksum mismatch"):
        storage.download(uri, tmp_path / "weights.bin")
    assert not (tmp_path / "weights.bin").exists()
    with pytest.raises(StorageError, match=rf"^{uri}: checksum mismatch"):
        storage.download(f"{s3_env}/ckpt", tmp_path / "ckpt")


class Forwarder:
    """Forwards TCP connections from a loopback port to another port, once started."""

    def __init__(self, port: int, upstream: int) -> None:
        self.port, self.upstream = port, upstream
        self.listener: socket.socket | None = None

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            return  # the other direction closed both sockets
        finally:
            source.close()
            sink.close()


@pytest.mark.integration
def test_transfer_retry_survives_a_server_that_comes_back(
    s3_env: str,
    s3_server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The endpoint is a closed port until the first retry warning is logged; then a forwarder to
    # the real server opens on it, as if the server had finished restarting. Deterministic: the
    # first attempt always fails, the second always reaches the server.
    port = free_port()
    forwarder = Forwarder(port, urlsplit(s3_server.endpoint).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "TRANSFER_BACKOFF_S", 0.0)

    class StartOnWarning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if forwarder.listener is None:
                forwarder.start()

    handler = StartOnWarning(level=logging.WARNING)
    logging.getLogger("alignpipe.storage").addHandler(handler)
    try:
        storage.write_bytes(f"{s3_env}/restart.txt", b"written after the restart")
    finally:
        logging.getLogger("alignpipe.storage").removeHandler(handler)
        forwarder.close()

    assert storage_warnings(caplog) == [
        f"{s3_env}/restart.txt: write failed (EndpointConnectionError), attempt 1 of 3; "
        "retrying in 0.0 s"
    ]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert storage.read_bytes(f"{s3_env}/restart.txt") == b"written after the restart"
