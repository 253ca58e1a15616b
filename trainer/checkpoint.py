"""Checkpoints of the trainable state, streamed to object storage in the background, and exact resume.

    CKPT = run.checkpoint_uri (default RUN/checkpoints): a path, file://, s3:// (CORA_S3_ENDPOINT), gs://
    CKPT/step-000000120/trainable.safetensors   generator + P: full fp32 tensors (the optimiser's master copy)
                        optimizer.safetensors   AdamW's exp_avg and exp_avg_sq of each of them
                        rng.safetensors         every rank's torch RNG state
                        state.json              counters, AdamW step, LR schedule, the data cursor of every
                                                rank, validation history, the run's config
                        manifest.json           written last: size and sha256 of each file above

A checkpoint is committed by its manifest: one without it, or with a file that does not match it
(missing, truncated, altered), is never loaded. The frozen LLM is never written. Nothing is unpickled
on load: tensors come from safetensors (a JSON header and raw bytes), everything else from JSON.

Saving is a collective (every rank all-gathers its ZeRO-3 partitions of the trainable state into
memory: the only part the training loop waits for); rank 0 hands the tensors to the ``Uploader``
thread, which writes them to a local staging directory, copies that to CKPT with retries and
back-off, writes the manifest, only then deletes the staged copy, and prunes CKPT to the last
``keep_last`` checkpoints plus the best. Training goes on meanwhile.
A staged checkpoint left by a crashed attempt is uploaded when the next attempt starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from cora.fileio import is_remote, open_fs

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
OPT_KEYS = ("exp_avg", "exp_avg_sq")
NAME = re.compile(r"step-\d{9}")
STAGED = "staged.json"          # written last into a staging directory: the staged files are complete


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (not committed, damaged, or for another model or run)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def _log(msg: str) -> None:
    print(f"[checkpoint] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ storage: list, verify, read, prune

def list_checkpoints(uri: str) -> list[str]:
    """Names of the step-* directories under ``uri`` (committed or not), oldest first."""
    fs, root = open_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and NAME.fullmatch(i.base_name))


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_manifest(uri: str, name: str) -> dict:
    fs, root = open_fs(uri)
    try:
        return json.loads(_read(fs, f"{root}/{name}/{MANIFEST}"))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}/{name} has no {MANIFEST}: it was never committed") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{uri}/{name}/{MANIFEST} is not valid JSON ({e})") from None


def read_checkpoint(uri: str, name: str) -> tuple[dict, dict[str, bytes]]:
    """(manifest, file bytes) of a committed checkpoint, every file checked against the manifest."""
    manifest = read_manifest(uri, name)
    fs, root = open_fs(uri)
    listed = manifest.get("files", {})
    if sorted(listed) != sorted(FILES):
        raise CheckpointError(f"{uri}/{name}: the manifest lists {sorted(listed)}, expected {list(FILES)}")
    files = {}
    for fname, meta in listed.items():
        try:
            data = _read(fs, f"{root}/{name}/{fname}")
        except FileNotFoundError:
            raise CheckpointError(f"{uri}/{name}/{fname} is missing") from None
        if len(data) != meta["size"]:
            raise CheckpointError(f"{uri}/{name}/{fname} has {len(data)} bytes, the manifest says {meta['size']} "
                                  f"(truncated or replaced)")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{uri}/{name}/{fname} does not match the sha256 in the manifest")
        files[fname] = data
    return manifest, files


def parse(files: dict[str, bytes]) -> tuple[dict, dict, dict, dict]:
    """(trainable, optimizer, rng, state) from a checkpoint's bytes: safetensors and JSON parsers only."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        tensors = [load(files[f]) for f in FILES[:3]]
        state = json.loads(files["state.json"])
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint file ({type(e).__name__}: {e})") from None
    return (*tensors, state)


def latest_committed(uri: str, warn: Callable[[str], None] = _log) -> tuple[str, dict, dict[str, bytes]] | None:
    """The newest checkpoint that verifies and parses, as (name, manifest, files); the others are
    skipped with a warning naming them. None when there is none."""
    for name in reversed(list_checkpoints(uri)):
        try:
            manifest, files = read_checkpoint(uri, name)
            parse(files)
            return name, manifest, files
        except CheckpointError as e:
            warn(f"skipping {uri}/{name}: {e}")
    return None


def prune(uri: str, keep_last: int) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` and the best (the newest one saved
    at an improved valid AUC), and uncommitted leftovers older than the newest commit. Manifests go
    first, so a half-deleted checkpoint is an uncommitted one. Returns the names deleted."""
    names = list_checkpoints(uri)
    manifests = {}
    for n in names:
        try:
            manifests[n] = read_manifest(uri, n)
        except CheckpointError:
            pass
    committed = [n for n in names if n in manifests]
    if not committed:
        return []
    keep = set(committed[-keep_last:]) if keep_last > 0 else set()
    best = [n for n in committed if manifests[n].get("best")]
    keep |= set(best[-1:])
    doomed = [n for n in names if n not in keep and n < committed[-1]]
    fs, root = open_fs(uri)
    for n in doomed:
        if n in manifests:
            fs.delete_file(f"{root}/{n}/{MANIFEST}")
        fs.delete_dir(f"{root}/{n}")
    return doomed


def clear(uri: str) -> list[str]:
    """Remove every step-* checkpoint under ``uri`` (run.overwrite)."""
    fs, root = open_fs(uri)
    names = list_checkpoints(uri)
    for n in names:
        fs.delete_dir(f"{root}/{n}")
    return names


def check_storage(uri: str) -> None:
    """Fail fast, naming the URI, when the checkpoint location cannot be written and read back (a local
    path: its nearest existing directory must be writable; nothing is created)."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise RuntimeError(f"cannot write checkpoints to {uri}: {existing} is not a writable directory; "
                               f"set run.checkpoint_uri or run.run_dir to a writable place")
        return
    try:
        fs, root = open_fs(uri, fail_fast=True)
        fs.create_dir(root)
        probe = f"{root}/.cora-probe-{time.time_ns()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        if _read(fs, probe) != b"ok":
            raise OSError("the probe object read back differently")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001  (pyarrow raises OSError, ValueError, ... by backend)
        raise RuntimeError(f"cannot write checkpoints to {uri}: {type(e).__name__}: {e}. Check the URI, "
                           f"the endpoint (CORA_S3_ENDPOINT) and the credentials, or set run.checkpoint_uri") from e


# ------------------------------------------------------------------ the background uploader

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
        files = meta["files"]             # sizes and sha256s, taken by stage() as it wrote the bytes
        retries = self._retry(f"creating {self.uri}/{name}", lambda: fs.create_dir(f"{root}/{name}"))
        for f in FILES:
            retries += self._retry(f"uploading {self.uri}/{name}/{f}",
                                   lambda f=f: _upload(fs, staged / f, f"{root}/{name}/{f}"))
        manifest = {"name": name, "step": meta["step"], "best": meta["best"], "valid_auc": meta.get("valid_auc"),
                    "world_size": meta["world_size"], "files": files, "committed_at": time.time()}
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


# ------------------------------------------------------------------ inside the worker group

def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adam_steps(engine) -> list[float]:
    """AdamW's step count of each flat fp32 partition (DeepSpeed ZeRO-3 keeps the optimiser state per
    partition group, not per parameter)."""
    zero = engine.optimizer
    return [float(zero.optimizer.state[g]["step"]) for g in zero.fp32_partitioned_groups_flat]


def _gather_partitions(zero, key: str | None, rank: int, world: int) -> list | None:
    """Every rank's fp32 partition of each flat parameter group (key None: the master weights, else
    that AdamW state), gathered on rank 0 only (one collective per group); None on other ranks."""
    import torch
    import torch.distributed as dist
    out = []
    for flat in zero.fp32_partitioned_groups_flat:
        local = (flat if key is None else zero.optimizer.state[flat][key]).detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, parts, dst=0)
        out.append(parts)
    return out if rank == 0 else None


def _assemble(zero, p, gathered: list):
    """A full parameter from the ranks' partitions: each rank holds the same-sized slice of every
    parameter at the same offset of its flat group (ZeRO-3 pads the last slice)."""
    import torch
    group, offset, n = zero.grad_position[zero.get_param_id(p)]
    return torch.cat([part[offset:offset + n] for part in gathered[group]])[:p.ds_numel].view(p.ds_shape)


def capture(engine, model, loop_state: dict, cursor: dict | None) -> tuple[dict, dict, dict, dict] | None:
    """(trainable, optimizer, rng, state) of this moment on rank 0, None on the others (a collective:
    every rank must call it at the same step). Full tensors are assembled from flat partitions
    gathered to rank 0: 3 gathers per parameter group, not 3 all-gathers per parameter."""
    import torch
    import torch.distributed as dist
    zero, rank, world = engine.optimizer, dist.get_rank(), dist.get_world_size()
    gathered = {k: _gather_partitions(zero, k, rank, world) for k in (None, *OPT_KEYS)}
    mine = {"rng": torch.get_rng_state().tolist(), "cursor": cursor,
            "cuda_rng": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)     # in memory between our own ranks; never read from storage
    if rank != 0:
        return None
    trainable, opt = {}, {}
    for n, p in _trainable(model):
        trainable[n] = _assemble(zero, p, gathered[None])
        for k in OPT_KEYS:
            opt[f"{n}::{k}"] = _assemble(zero, p, gathered[k])
    rng = {f"rank{r}": torch.tensor(m["rng"], dtype=torch.uint8) for r, m in enumerate(ranks)}
    rng.update({f"rank{r}.cuda": torch.tensor(m["cuda_rng"], dtype=torch.uint8)
                for r, m in enumerate(ranks) if m["cuda_rng"] is not None})
    state = {"loop": json.loads(json.dumps(loop_state, default=float)),      # a snapshot: training goes on
             "cursors": [m["cursor"] for m in ranks], "world_size": world,
             "adam_steps": _adam_steps(engine), "scheduler": engine.lr_scheduler.state_dict(),
             "global_steps": engine.global_steps, "global_samples": engine.global_samples,
             "micro_steps": engine.micro_steps}
    return trainable, opt, rng, state


def stage(staging: Path, step: int, parts: tuple[dict, dict, dict, dict], best: bool, valid_auc: float | None,
          config: dict, requested_at: float | None = None) -> Path:
    """Write a captured checkpoint into ``staging/step-N`` (rank 0), hashing each file's bytes as they
    are written; STAGED, written last, marks it complete and records the sizes and sha256s."""
    from safetensors.torch import save
    trainable, opt, rng, state = parts
    out = staging / checkpoint_name(step)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    blobs = {"trainable.safetensors": lambda: save(trainable), "optimizer.safetensors": lambda: save(opt),
             "rng.safetensors": lambda: save(rng),
             "state.json": lambda: json.dumps(dict(state, config=config), default=float).encode()}
    files = {}
    for name, make in blobs.items():
        data = make()
        (out / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        del data
    (out / STAGED).write_text(json.dumps({"step": step, "best": best, "valid_auc": valid_auc,
                                          "world_size": state["world_size"], "files": files,
                                          "requested_at": requested_at or time.time()}))
    return out


def load_into(engine, model, files: dict[str, bytes], rank: int) -> dict:
    """Put a verified checkpoint's state into the engine (every rank); returns its state.json."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    trainable, opt, rng, state = parse(files)
    params = _trainable(model)
    want = {n: tuple(p.ds_shape) for n, p in params}
    have = {n: tuple(t.shape) for n, t in trainable.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise CheckpointError(f"the checkpoint holds other trainable tensors than this model (e.g. {diff}): "
                              f"it was saved with a different generator, injection or LLM config")
    if state["world_size"] != engine.world_size:
        raise CheckpointError(f"the checkpoint was saved by {state['world_size']} workers and this run has "
                              f"{engine.world_size}: the data cursors are per rank; resume with "
                              f"run.workers={state['world_size']}")
    zero = engine.optimizer
    for g in zero.fp32_partitioned_groups_flat:   # AdamW creates its state at the first step: create it now
        if not zero.optimizer.state[g]:
            zero.optimizer.state[g] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(g),
                                       "exp_avg_sq": torch.zeros_like(g)}
    for n, p in params:
        safe_set_full_fp32_param(p, trainable[n])
        for k in OPT_KEYS:
            safe_set_full_optimizer_state(p, opt[f"{n}::{k}"], k)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(trainable[n])
    for g, s in zip(zero.fp32_partitioned_groups_flat, state["adam_steps"]):
        st = zero.optimizer.state[g]["step"]
        zero.optimizer.state[g]["step"] = torch.tensor(s, dtype=st.dtype) if torch.is_tensor(st) else s
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(zero.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.micro_steps = state["micro_steps"]
    torch.set_rng_state(rng[f"rank{rank}"])
    if f"rank{rank}.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"])
    return state


class Checkpointer:
    """The worker group's checkpointing: ``due``/``save`` during training, ``restore`` at start, ``close``
    at the end. A checkpoint every ``every`` steps (0: only when the loop asks), staged in the local
    directory ``staging``; ``config`` (the run's config) goes into each state.json."""

    def __init__(self, uri: str, every: int, keep_last: int, staging: str | Path, config: dict, rank: int,
                 backoff: tuple[float, float] = (0.5, 30.0)):
        self.uri, self.every, self.rank, self.config = uri, every, rank, config
        self.staging = Path(staging)
        self.uploader = Uploader(self.uri, keep_last, backoff) if rank == 0 else None
        self.save_seconds: list[float] = []      # time the training loop was held by each save

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, engine, model, step: int, loop_state: dict, cursor: dict | None, best: bool = False,
             valid_auc: float | None = None) -> None:
        t, now = time.perf_counter(), time.time()
        parts = capture(engine, model, loop_state, cursor)        # the only part the training loop waits for
        if parts is not None:
            self.uploader.submit(lambda: stage(self.staging, step, parts, best, valid_auc, self.config, now))
        self.save_seconds.append(time.perf_counter() - t)

    def restore(self, engine, model) -> dict | None:
        """Load the newest committed checkpoint (after committing any a crashed attempt staged); None
        when there is none. Rank 0 reads and verifies it and sends the bytes to the other ranks."""
        import torch.distributed as dist
        found = [None]
        if self.uploader is not None:
            if self.uploader.resubmit(self.staging):
                self.uploader.flush()
            latest = latest_committed(self.uri)
            if latest is not None:
                found = [(latest[0], latest[2])]
                _log(f"resuming from {self.uri}/{latest[0]}")
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return None
        name, files = found[0]
        state = load_into(engine, model, files, self.rank)
        state["name"] = name
        return state

    def close(self) -> list[Commit]:
        """Wait for every upload to commit (rank 0) and return the commits."""
        import torch.distributed as dist
        commits = []
        if self.uploader is not None:
            self.uploader.close()
            commits = self.uploader.commits
        dist.barrier()
        return commits
