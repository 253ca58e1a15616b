"""The run directory (``run.run_dir``): a local path, or an object-storage URI (``s3://``, ``gs://``;
``file://`` is a local path).

    RUN/config.json                the run's config (the driver writes it before the workers start)
    RUN/metrics.json               rank 0, at the end
    RUN/tensorboard/               rank 0's event files
    RUN/export/, RUN/*_predictions.parquet   rank 0, at each better validation
    RUN/samples/rank<r>.jsonl      rank r's sample log (run.sample_log)
    RUN/checkpoints/               the default run.checkpoint_uri (trainer.checkpoint streams them itself)

A worker never writes object storage file by file as it goes (TensorBoard appends to its event file,
the sample log to its lines; an object can only be replaced whole): it writes into a local ``Mirror`` of
the run directory on its node (``$CORA_CACHE/runs/<key>``, one per `cora train` invocation) and copies the
files it owns to RUN at its sync points: after each evaluation, every ``SYNC_EVERY_S`` seconds at a step's
end, and at the end. An intermediate sync that fails (storage unreachable) is logged and caught up at the
next one, nothing is lost (the files stay in the mirror); the final sync retries with back-off for
``run.sync_timeout_s`` seconds and then fails the worker with ``SyncError``, naming the files and the
local copy. (Ray Train then restarts the group, up to ``run.max_failures`` times: the new group restores
the last checkpoint, finds nothing left to train and syncs again.) For a local run directory the mirror
is the directory itself and syncing does nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from cora.fileio import is_remote, join, open_fs

SYNC_EVERY_S = 60.0
"""Seconds between two syncs of a worker's files during training (object-storage run directories)."""


class SyncError(RuntimeError):
    """The run's files could not be copied to the run directory (storage unreachable past the timeout)."""


def _log(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("CORA_CACHE", Path.home() / ".cache" / "cora")) / "runs"


class Mirror:
    """Where a worker writes its run files (``local``), and their copy to the run directory ``uri``.

    ``owned``: the paths under the run directory this worker copies (files, or directories whose files
    it copies), e.g. rank 0: metrics.json, tensorboard, export, ...; rank r: samples/rank<r>.jsonl only.
    ``key``: names the local mirror (the driver's, one per invocation, so that a restarted group on the
    same node finds and copies what the failed one left unsynced)."""

    def __init__(self, uri: str, owned: list[str], key: str, timeout_s: float = 300.0,
                 backoff: tuple[float, float] = (0.5, 15.0)):
        self.uri, self.owned, self.timeout_s, self.backoff = uri, list(owned), timeout_s, backoff
        self.remote = is_remote(uri)
        self.local = cache_root() / key if self.remote else Path(uri)
        self.local.mkdir(parents=True, exist_ok=True)
        self._synced: dict[str, tuple[int, int]] = {}      # relative path -> (size, mtime_ns) last copied
        self._last = time.monotonic()

    def pull(self, rel: str) -> None:
        """Copy RUN/``rel`` into the mirror when it exists (a file this worker appends to: the sample log of
        a resumed run), so that the next sync does not replace it by the new lines only."""
        if not self.remote:
            return
        fs, root = open_fs(self.uri)
        target = self.local / rel
        try:
            with fs.open_input_stream(f"{root}/{rel}") as f:
                data = f.read()
        except FileNotFoundError:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        st = target.stat()
        self._synced[rel] = (st.st_size, st.st_mtime_ns)

    def pending(self) -> list[str]:
        """The owned files (relative paths) changed since they were last copied."""
        out = []
        for rel in self.owned:
            path = self.local / rel
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
            for f in files:
                r = f.relative_to(self.local).as_posix()
                st = f.stat()
                if self._synced.get(r) != (st.st_size, st.st_mtime_ns) and not f.name.startswith("."):
                    out.append(r)
        return out

    def due(self) -> bool:
        return self.remote and time.monotonic() - self._last >= SYNC_EVERY_S

    def sync(self, final: bool = False) -> list[str]:
        """Copy the changed owned files to RUN; returns those copied. Not final: one quick attempt per
        file (a failure is logged, the rest waits for the next sync). Final: retry until everything is
        copied or ``timeout_s`` has passed, then raise SyncError."""
        self._last = time.monotonic()
        if not self.remote:
            return []
        done: list[str] = []
        deadline, delay = time.monotonic() + self.timeout_s, self.backoff[0]
        while True:
            left, error = self._copy(self.pending(), done, fail_fast=not final)
            if not left:
                return done
            if not final:
                _log(f"copying {len(left)} file(s) (e.g. {left[0]}) to {self.uri} failed ({error}); they are kept "
                     f"in {self.local} and copied at the next sync")
                return done
            if time.monotonic() + delay > deadline:
                raise SyncError(f"could not copy {len(left)} file(s) of the run ({', '.join(left[:3])}) to "
                                f"{self.uri} within run.sync_timeout_s={self.timeout_s:g}s: {error}. They are kept in "
                                f"{self.local} on this node; check the storage (endpoint, credentials), then copy "
                                f"them there, or continue the run with run.resume=auto (it syncs them again)")
            _log(f"copying {len(left)} file(s) to {self.uri} failed ({error}); retrying in {delay:.1f}s")
            time.sleep(delay)
            delay = min(2 * delay, self.backoff[1])

    def _copy(self, rels: list[str], done: list[str], fail_fast: bool) -> tuple[list[str], str | None]:
        """Copy ``rels`` (appending each copied one to ``done``); returns (those not copied, the error)."""
        try:
            fs, root = open_fs(self.uri, fail_fast=fail_fast)
        except OSError as e:
            return rels, f"{type(e).__name__}: {e}"
        for k, rel in enumerate(rels):
            f = self.local / rel
            st = f.stat()
            try:
                with open(f, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except OSError as e:          # pyarrow's storage errors (connection refused, timeouts, 5xx)
                return rels[k:], f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            self._synced[rel] = (st.st_size, st.st_mtime_ns)
            done.append(rel)
        return [], None

    def discard(self) -> None:
        """Delete the local mirror (after a final sync; never the run directory itself)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def mirror_key(uri: str) -> str:
    """A fresh name for one invocation's local mirror of ``uri``: readable prefix + unique suffix."""
    tail = "".join(c if c.isalnum() or c in "-_" else "-" for c in uri.split("://")[-1])[-48:]
    return f"{tail}-{hashlib.sha256(f'{uri}{time.time_ns()}{os.getpid()}'.encode()).hexdigest()[:10]}"


def owned_files(rank: int) -> list[str]:
    """The run files rank ``rank`` writes (and syncs)."""
    mine = [f"samples/rank{rank}.jsonl"]
    if rank == 0:
        mine += ["tensorboard", "export", "test_predictions.parquet", "rank_predictions.parquet", "metrics.json",
                 "untrained_test_predictions.parquet"]
    return mine


def run_path(uri: str, *parts: str) -> str:
    """RUN/parts as a path or URI string."""
    return join(uri, *parts)
