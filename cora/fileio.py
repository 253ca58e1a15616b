"""File helpers shared by the stages: checksums and manifest entries, atomic directory replacement,
and opening local or object-storage locations through ``pyarrow.fs``.

Every manifest this project writes (a data directory's dataset.json, a CF run's cf.json, a
checkpoint's manifest.json) lists its files in one format, ``"files": {name: {"size": bytes, DIGEST:
hex}}`` with ``"files_version": 2`` beside it (``file_entry``). DIGEST names the hash: ``"sha256"``, or
``"xxh3_128"`` (xxHash's XXH3, 128 bits) for a checkpoint's tensor files, which are hashed as they are
written while the ranks train: 14 GB/s against sha256's 1.4 GB/s on this project's machine, so a 372 MB
checkpoint costs 0.03 s of CPU instead of 0.26 s. Version 1 entries hold sha256 only. ``entry_problem``
checks a file against an entry of either version or of the older formats (data: ``{"bytes",
"sha256"}``; CF: the bare sha256). Both hashes catch a truncated, corrupted or replaced file; neither is
meant to resist someone who can also rewrite the manifest.

Object storage: ``s3://bucket/path`` (``gs://``, ``hdfs://`` and ``file://`` work the same way).
An S3-compatible server other than AWS is selected with ``CORA_S3_ENDPOINT`` (e.g.
``http://127.0.0.1:9000``), the region with ``AWS_DEFAULT_REGION``. Credentials are never handed from
process to process: each process finds its own through the SDK's chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` in its environment, inherited from the Ray node it
runs on; ``~/.aws/credentials`` and ``AWS_PROFILE``; the instance role; for GCS the service account or
``GOOGLE_APPLICATION_CREDENTIALS`` on the node). ``storage_env()`` is what Ray actors are given so that
they use the same endpoint and region as the process that starts them: never a secret, because a
runtime_env is shown in the Ray dashboard's job and actor views.
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

STORAGE_ENV = ("CORA_S3_ENDPOINT", "AWS_DEFAULT_REGION", "AWS_REGION")
"""Storage settings a Ray actor is given (runtime_env, visible in the dashboard): where, never who."""
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
"""Credentials (or where they are) that must not travel in a runtime_env: each node has its own."""


FILES_VERSION = 2
"""2: an entry's digest is "sha256" or "xxh3_128"; 1: "sha256" only."""

DIGESTS = ("sha256", "xxh3_128")


def hasher(digest: str = "sha256"):
    """A fresh hash object (``update``, ``hexdigest``) of one of ``DIGESTS``."""
    if digest == "sha256":
        return hashlib.sha256()
    if digest == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    raise ValueError(f"unknown digest {digest!r}; this version reads {', '.join(DIGESTS)}")


def hexdigest(data: bytes, digest: str = "sha256") -> str:
    """The hex digest of bytes in memory."""
    h = hasher(digest)
    h.update(data)
    return h.hexdigest()


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path, "sha256")


def file_digest(path: str | Path, digest: str) -> str:
    """Hex digest (one of ``DIGESTS``) of a file's bytes."""
    h = hasher(digest)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(source: str | Path | bytes, digest: str = "sha256") -> dict:
    """The manifest entry of a file (a path) or of its bytes: {"size", digest}."""
    if isinstance(source, bytes):
        return {"size": len(source), digest: hexdigest(source, digest)}
    return {"size": Path(source).stat().st_size, digest: file_digest(source, digest)}


def entry_digest(entry: dict | str) -> tuple[str | None, str | None]:
    """(digest name, hex) of a manifest entry of any format ever written; (None, None) when it holds none of
    ``DIGESTS`` (a newer version's hash)."""
    if isinstance(entry, str):
        return "sha256", entry
    for name in DIGESTS:
        if name in entry:
            return name, entry[name]
    return None, None


def entry_problem(entry: dict | str, size: int, digest: Callable[[str], str]) -> str | None:
    """Why a file of ``size`` bytes, whose hex digest ``digest(name)`` computes (only when the size matches,
    with the hash the entry names), does not match its manifest ``entry``; None when it does. Reads every
    entry format ever written."""
    want_size = None if isinstance(entry, str) else entry.get("size", entry.get("bytes"))
    name, want = entry_digest(entry)
    if name is None:
        return (f"has a manifest entry with no digest this version reads ({', '.join(DIGESTS)}): "
                f"{sorted(entry)}; read it with the version that wrote it")
    if want_size is not None and size != want_size:
        return f"has {size} bytes where the manifest says {want_size} (truncated or replaced)"
    if digest(name) != want:
        return f"does not match the {name} in the manifest (changed or corrupted)"
    return None


def bytes_problem(data: bytes, entry: dict | str) -> str | None:
    """``entry_problem`` of bytes in memory."""
    return entry_problem(entry, len(data), lambda name: hexdigest(data, name))


def file_problem(path: str | Path, entry: dict | str) -> str | None:
    """``entry_problem`` of a local file, or "is missing"."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    return entry_problem(entry, path.stat().st_size, lambda name: file_digest(path, name))


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


SCHEMES = ("s3", "gs", "gcs", "hdfs", "file")
"""URI schemes a run or data location may use (through ``pyarrow.fs``)."""


def location_problem(value: str, key: str) -> str | None:
    """Why ``value`` is no usable location for config key ``key`` (a path, or a URI of ``SCHEMES``); None
    when it is one. Catches what would otherwise silently become a local folder: ``s3:/b/r`` (what
    ``Path("s3://b/r")`` prints), a scheme without "//", an unknown scheme, a URI without a bucket."""
    import re
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", value)
    if not m or (len(m.group(1)) == 1 and m.group(2) in ("/", "")):     # a path (or a Windows drive letter)
        return None
    scheme, slashes, rest = m.group(1), m.group(2), m.group(3)
    if scheme.lower() not in SCHEMES:
        return (f"{key}={value!r} has the scheme {scheme!r}, which is none of {', '.join(s + '://' for s in SCHEMES)}; "
                f"give a path or one of those URIs")
    if scheme.lower() == "file":
        return None if slashes.startswith("//") else (f"{key}={value!r} is not a URI (file: must be followed by "
                                                      f"//); did you mean file:///{rest}?")
    if len(slashes) > 2 or (slashes == "//" and not rest.split("/")[0]):
        return f"{key}={value!r} names no bucket; write {scheme.lower()}://BUCKET/PATH"
    if slashes != "//":
        return (f"{key}={value!r} is not a URI ({scheme}: must be followed by //); did you mean "
                f"{scheme.lower()}://{rest}?")
    return None


def location(value: str | Path) -> str:
    """A location as the stages store it: an object-storage URI unchanged (trailing "/" removed), a path or
    ``file://`` URI as an absolute local path (so that it does not depend on the working directory)."""
    value = str(value)
    if is_remote(value):
        return value.rstrip("/")
    return str(Path(value.removeprefix("file://")).absolute())


def join(base: str, *parts: str) -> str:
    """``base``/part/... for a path or a URI (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(uri: str) -> bytes:
    """The bytes of a file at a path or URI (FileNotFoundError when there is none)."""
    fs, path = open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file at a path or URI whole: locally through a temporary file and a rename, in object
    storage as one PUT (an object appears complete or not at all)."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, path = open_fs(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    """Whether a file or directory (any object under the prefix, in object storage) is at a path or URI."""
    fs, path = open_fs(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        return True
    return bool(is_remote(uri) and fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def read_parquet(uri: str):
    """A Parquet file at a path or URI as a pyarrow Table."""
    import pyarrow.parquet as pq
    fs, path = open_fs(uri)
    return pq.read_table(path, filesystem=fs)


def storage_env() -> dict[str, str]:
    """This process's storage endpoint and region (for a Ray actor's runtime_env); no credentials."""
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
