"""The background uploader: rank 0 hands captured checkpoints to a stager thread (writes them to a
local staging directory, hashing as it writes) and a committer thread (copies them to the checkpoint
URI with retries and back-off, writes the manifest last, deletes the staged copy, prunes)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from cora.fileio import FILES_VERSION, file_entry, hasher, open_fs

from .storage import FILES, MANIFEST, STAGED, _log, checkpoint_name, prune


@dataclass
class Commit:
    name: str
    bytes: int
    request_to_commit_s: float
    retries: int


class Uploader:
    """Two threads: the stager writes captured checkpoints to the local staging directory (so memory
    holds at most what the disk has not absorbed yet), the committer uploads staged checkpoints to
    ``uri`` one after another, retrying storage errors with exponential back-off (``backoff`` = first,
    max delay in seconds), and deletes a staged copy only after its manifest is written. During a
    storage outage staged copies accumulate on disk and are committed in order when it ends."""

    def __init__(self, uri: str, keep_last: int, backoff: tuple[float, float] = (0.5, 30.0)):
        self.uri, self.keep_last, self.backoff = uri, keep_last, backoff
        self.commits: list[Commit] = []
        self.error: BaseException | None = None
        self._to_stage: queue.Queue = queue.Queue()
        self._to_commit: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, args=(self._to_stage, self._stage), daemon=True,
                                          name="checkpoint-stager"),
                         threading.Thread(target=self._loop, args=(self._to_commit, self._commit), daemon=True,
                                          name="checkpoint-committer")]
        for t in self._threads:
            t.start()

    def submit(self, staged: Path | Callable[[], Path]) -> None:
        """Queue a staged checkpoint directory, or a function that stages one (run on the stager)."""
        self._to_stage.put(staged)

    def resubmit(self, staging: Path) -> list[Path]:
        """Queue the complete staged checkpoints a crashed attempt left behind (oldest first)."""
        found = sorted(p for p in staging.glob("step-*") if (p / STAGED).is_file()) if staging.is_dir() else []
        for p in found:
            _log(f"uploading {p.name}, staged by an earlier attempt and never committed")
            self.submit(p)
        return found

    def flush(self) -> None:
        """Wait until everything submitted is committed (or a thread failed: re-raised here)."""
        self._to_stage.join()
        self._to_commit.join()
        if self.error is not None:
            raise RuntimeError(f"checkpoint upload to {self.uri} failed") from self.error

    def close(self) -> None:
        self.flush()
        for q, t in zip((self._to_stage, self._to_commit), self._threads):
            q.put(None)
            t.join()

    def _stage(self, item: Path | Callable[[], Path]) -> None:
        self._to_commit.put(item() if callable(item) else item)

    def _loop(self, q: queue.Queue, work: Callable) -> None:
        try:        # Linux: lowest CPU priority for this thread, so serialising, hashing and copying
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)   # use idle cycles first
        except (AttributeError, OSError):
            pass
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    work(item)
            except BaseException as e:  # noqa: BLE001  (kept for flush(); the staged copy stays)
                self.error = e
            finally:
                q.task_done()

    def _retry(self, what: str, fn: Callable[[], object]) -> int:
        delay, tries = self.backoff[0], 0
        while True:
            try:
                fn()
                return tries
            except OSError as e:          # pyarrow's storage errors (connection refused, timeouts, 5xx)
                tries += 1
                _log(f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     f"retry {tries} in {delay:.1f}s, the staged copy is kept")
                time.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    def _commit(self, staged: Path) -> None:
        meta = json.loads((staged / STAGED).read_text())
        name = staged.name
        fs, root = open_fs(self.uri)
        files = meta["files"]             # sizes and digests, taken by stage() as it wrote the bytes
        retries = self._retry(f"creating {self.uri}/{name}", lambda: fs.create_dir(f"{root}/{name}"))
        for f in FILES:
            retries += self._retry(f"uploading {self.uri}/{name}/{f}",
                                   lambda f=f: _upload(fs, staged / f, f"{root}/{name}/{f}"))
        manifest = {"name": name, "step": meta["step"], "best": meta["best"], "valid_auc": meta.get("valid_auc"),
                    "world_size": meta["world_size"], "files_version": FILES_VERSION, "files": files,
                    "committed_at": time.time()}
        body = json.dumps(manifest, indent=1).encode()
        retries += self._retry(f"committing {self.uri}/{name}", lambda: _write(fs, f"{root}/{name}/{MANIFEST}", body))
        self.commits.append(Commit(name, sum(v["size"] for v in files.values()) + len(body),
                                   time.time() - meta["requested_at"], retries))
        shutil.rmtree(staged)
        try:
            prune(self.uri, self.keep_last)
        except OSError as e:              # pruning is retried at the next commit
            _log(f"pruning {self.uri} failed ({e}); will try again after the next checkpoint")


def _write(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _upload(fs, local: Path, path: str) -> None:
    """Copy a staged file to storage; a local destination on the same filesystem gets a hard link
    (the staged copy is deleted after the commit, so linking saves a full copy)."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            Path(path).unlink(missing_ok=True)
            os.link(local, path)
            return
        except OSError:                   # another filesystem: copy
            pass
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


DIGEST = "xxh3_128"
"""The hash of a checkpoint's tensor files, taken as they are written (``cora.fileio``: 10x cheaper than sha256)."""


@dataclass
class Pieces:
    """A tensor given as the 1-D pieces its elements are, in order (a ZeRO-3 parameter: each rank's slice of
    it, the last one cut at the parameter's end), written without assembling it (``write_safetensors``)."""
    shape: tuple
    pieces: list


_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class DirectFile:
    """A file written as one stream through an aligned buffer of ``buffer_bytes``, with ``O_DIRECT`` where the
    filesystem takes it: each full buffer goes from this process's memory to the disk without passing through
    the page cache, and the digest of the bytes (xxh3-128, ``cora.fileio``) is taken from the same buffer.

    Why: staging a 372 MB checkpoint buffered cost 1.15-1.29 s of CPU on this 2-core VM, almost all of it
    the kernel allocating and filling fresh page-cache pages (every checkpoint's pages are new), against
    0.29 s written direct and hashed with sha256 (0.26 s of it the hash), and 0.085 s with xxh3-128
    (``benchmarks/checkpoint.py --stage-only``; the ranks that train use both cores, so that CPU comes out of
    training). The copy into the buffer and the hashing release the
    GIL. Where ``O_DIRECT`` is refused (tmpfs before Linux 6.6, some network filesystems, not Linux) the same
    stream is written buffered, as it is with ``direct=False``; the attribute ``direct`` says which. The last
    block is written padded to the 4 KiB alignment direct I/O needs and the file is then cut to its length."""

    ALIGN = 4096

    def __init__(self, path: Path, buffer_bytes: int = 16 << 20, direct: bool = True):
        import mmap

        import torch
        size = max(self.ALIGN, buffer_bytes // self.ALIGN * self.ALIGN)
        self._map = mmap.mmap(-1, size)                     # page-aligned, as O_DIRECT needs
        self._buf = torch.frombuffer(self._map, dtype=torch.uint8)
        self._fill, self.size = 0, 0
        self.digest = hasher(DIGEST)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0) if direct else 0
        self.direct = False
        if direct:
            try:
                self._fd = os.open(path, flags | direct, 0o644)
                self.direct = True
            except OSError:                                # EINVAL: this filesystem has no direct I/O
                pass
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)

    def write(self, data) -> None:
        """Append ``data``: a 1-D uint8 tensor (copied with torch, which releases the GIL) or bytes."""
        import torch
        if not isinstance(data, torch.Tensor):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        at, n = 0, data.numel()
        while at < n:
            take = min(self._buf.numel() - self._fill, n - at)
            self._buf[self._fill:self._fill + take].copy_(data[at:at + take])
            self._fill += take
            at += take
            if self._fill == self._buf.numel():
                self._flush()

    def _flush(self) -> None:
        n = self._fill
        with memoryview(self._map) as view:
            self.digest.update(view[:n])
            try:
                _write_all(self._fd, view[:-(-n // self.ALIGN) * self.ALIGN] if self.direct else view[:n])
            except OSError as e:
                import errno
                import fcntl
                if not (self.direct and e.errno == errno.EINVAL and self.size == 0):
                    raise
                # opened with O_DIRECT but refused at the first write: go on buffered
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                os.lseek(self._fd, 0, os.SEEK_SET)
                self.direct = False
                _write_all(self._fd, view[:n])
        self.size += n
        self._fill = 0

    def close(self) -> dict:
        """Write what is left, cut the padding and close; returns the manifest entry {"size", DIGEST}."""
        try:
            if self._fill:
                self._flush()
            if self.direct:
                os.ftruncate(self._fd, self.size)
        finally:
            os.close(self._fd)
            del self._buf
            try:
                self._map.close()
            except BufferError:      # a failed write's traceback still holds a view: freed with it
                pass
        return {"size": self.size, DIGEST: self.digest.hexdigest()}


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def write_safetensors(path: Path, tensors: dict, buffer_bytes: int = 16 << 20, direct: bool = True) -> dict:
    """Write ``tensors`` (name -> tensor or ``Pieces``) as a safetensors file, streaming each tensor's bytes
    through a ``DirectFile`` (to the disk and to the hash once, with no serialised copy in memory and no
    page cache where the filesystem allows); returns the file's manifest entry {"size", DIGEST}. The
    format: an 8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte
    range; padded with spaces to a multiple of 8), the tensors' bytes in header order."""
    import struct

    import torch
    header, spans, at = {}, [], 0
    for name, t in tensors.items():
        pieces = [x.reshape(-1) for x in (t.pieces if isinstance(t, Pieces) else [t])]
        dtype = pieces[0].dtype
        if any(x.dtype != dtype for x in pieces) or str(dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"cannot write {name!r}: dtype {[str(x.dtype) for x in pieces]}")
        shape = list(t.shape)
        size = sum(x.numel() for x in pieces) * dtype.itemsize
        if size != int(torch.Size(shape).numel()) * dtype.itemsize:
            raise ValueError(f"{name!r}: pieces of {size} bytes for shape {shape}")
        header[name] = {"dtype": _DTYPES[str(dtype).removeprefix("torch.")], "shape": shape,
                        "data_offsets": [at, at + size]}
        spans.append(pieces)
        at += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out = DirectFile(path, buffer_bytes, direct)
    try:
        out.write(struct.pack("<Q", len(text)) + text)
        for pieces in spans:
            for x in pieces:
                out.write(x.detach().cpu().contiguous().view(torch.uint8).reshape(-1))
    finally:
        entry = out.close()
    return entry


def stage(staging: Path, step: int, parts: tuple[dict, dict, dict, dict], best: bool, valid_auc: float | None,
          config: dict, requested_at: float | None = None, direct: bool = True) -> Path:
    """Write a captured checkpoint into ``staging/step-N`` (rank 0), hashing each file's bytes as they
    are written; STAGED, written last, marks it complete and records the sizes and digests. Tensors may be
    ``Pieces`` (the ZeRO-3 partitions as captured): they are written without being assembled. ``direct``:
    bypass the page cache where the filesystem allows (``DirectFile``); false writes through it."""
    trainable, opt, rng, state = parts
    out = staging / checkpoint_name(step)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = {name: write_safetensors(out / name, tensors, direct=direct) for name, tensors in
             (("trainable.safetensors", trainable), ("optimizer.safetensors", opt), ("rng.safetensors", rng))}
    data = json.dumps(dict(state, config=config), default=float).encode()
    (out / "state.json").write_bytes(data)
    files["state.json"] = file_entry(data)
    (out / STAGED).write_text(json.dumps({"step": step, "best": best, "valid_auc": valid_auc,
                                          "world_size": state["world_size"], "files": files,
                                          "requested_at": requested_at or time.time()}))
    return out
