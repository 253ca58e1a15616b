"""File helpers shared by the stages: checksums and manifest entries, atomic directory replacement,
and opening local or object-storage locations through ``pyarrow.fs``.

Every manifest this project writes (a data directory's dataset.json, a CF run's cf.json, a
checkpoint's manifest.json) lists its files in one format, ``"files": {name: {"size": bytes, "sha256":
hex}}`` with ``"files_version": 1`` beside it (``file_entry``); ``entry_problem`` checks a file against
an entry of this format or of the older ones (data: ``{"bytes", "sha256"}``; CF: the bare sha256).

Object storage: ``s3://bucket/path`` (``gs://``, ``hdfs://`` and ``file://`` work the same way).
An S3-compatible server other than AWS is selected with ``CORA_S3_ENDPOINT`` (e.g.
``http://127.0.0.1:9000``); credentials come from the usual ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` (or the machine's role). ``storage_env()`` is what
Ray actors need to see the same storage as the process that starts them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs

STORAGE_ENV = ("CORA_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS")


FILES_VERSION = 1


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(source: str | Path | bytes) -> dict:
    """The manifest entry of a file (a path) or of its bytes: {"size", "sha256"}."""
    if isinstance(source, bytes):
        return {"size": len(source), "sha256": hashlib.sha256(source).hexdigest()}
    return {"size": Path(source).stat().st_size, "sha256": sha256(source)}


def entry_problem(entry: dict | str, size: int, digest: Callable[[], str]) -> str | None:
    """Why a file of ``size`` bytes, whose sha256 ``digest()`` computes (only when the size matches), does
    not match its manifest ``entry``; None when it does. Reads every entry format ever written."""
    want_size, want_sha = (None, entry) if isinstance(entry, str) else (entry.get("size", entry.get("bytes")),
                                                                         entry["sha256"])
    if want_size is not None and size != want_size:
        return f"has {size} bytes where the manifest says {want_size} (truncated or replaced)"
    if digest() != want_sha:
        return "does not match the sha256 in the manifest (changed or corrupted)"
    return None


def file_problem(path: str | Path, entry: dict | str) -> str | None:
    """``entry_problem`` of a local file, or "is missing"."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    return entry_problem(entry, path.stat().st_size, lambda: sha256(path))


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh sibling directory ``.NAME.tmp-*``, then rename it to ``out_dir``.

    An existing ``out_dir`` is moved aside first and deleted after the rename; if ``write`` fails the
    temporary directory is removed and ``out_dir`` is untouched. So ``out_dir`` is always either the
    old complete directory or the new complete one, never a half-written one.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def open_fs(uri: str | Path, create_buckets: bool = False, fail_fast: bool = False) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://``, ``s3://`` (honouring
    ``CORA_S3_ENDPOINT``), ``gs://`` or any other URI pyarrow knows. Buckets are never created
    unless ``create_buckets``; ``fail_fast`` (S3): short timeouts and no retries, for probes."""
    uri = str(uri)
    endpoint = os.environ.get("CORA_S3_ENDPOINT")
    if uri.startswith("s3://") and endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        quick = {"connect_timeout": 5, "request_timeout": 10,
                 "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)} if fail_fast else {}
        fs = pafs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme, allow_bucket_creation=create_buckets,
                               region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
                               **quick)
        return fs, uri[len("s3://"):].rstrip("/")
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    return pafs.FileSystem.from_uri(uri)


def storage_env() -> dict[str, str]:
    """The storage-related environment variables of this process (for a Ray actor's runtime_env)."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
