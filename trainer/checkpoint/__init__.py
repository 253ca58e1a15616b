"""Checkpoints of the trainable state, streamed to object storage in the background, and exact resume.

    CKPT = run.checkpoint_uri (default RUN/checkpoints): a path, file://, s3:// (CORA_S3_ENDPOINT), gs://
    CKPT/step-000000120/trainable.safetensors   generator + P: full fp32 tensors (the optimiser's master copy)
                        optimizer.safetensors   AdamW's exp_avg and exp_avg_sq of each of them
                        rng.safetensors         every rank's torch RNG state
                        state.json              counters, AdamW step, LR schedule, the data cursor of every
                                                rank, validation history, the run's config
                        manifest.json           written last: size and digest of each file above
                                                (xxh3-128 for the safetensors files, sha256 for state.json)

A checkpoint is committed by its manifest: one without it, or with a file that does not match it
(missing, truncated, altered), is never loaded. The frozen LLM is never written. Nothing is unpickled
on load: tensors come from safetensors (a JSON header and raw bytes), everything else from JSON.

Saving is a collective (every rank sends its ZeRO-3 partitions of the trainable state to rank 0's
memory: the only part the training loop waits for); rank 0 hands them to the ``Uploader``'s stager
thread, which assembles the full tensors, writes them to a local staging directory, copies that to CKPT with retries and
back-off, writes the manifest, only then deletes the staged copy, and prunes CKPT to the last
``keep_last`` checkpoints plus the best. Training goes on meanwhile.
A staged checkpoint left by a crashed attempt is uploaded when the next attempt starts.

The package: ``storage`` (list, verify, read, prune, clear, probe a URI), ``uploader`` (staging and the
background commit), ``zero_state`` (capture and restore of the ZeRO-3 partitions); ``Checkpointer``,
here, is what the training loop uses.
"""

from __future__ import annotations

import time
from pathlib import Path

from .storage import (FILES, MANIFEST, NAME, STAGED, CheckpointError, _log, check_storage, checkpoint_name, clear,
                      latest_committed, list_checkpoints, newest_state, parse, prune, read_checkpoint, read_commit)
from .uploader import Commit, DirectFile, Pieces, Uploader, stage, write_safetensors
from .zero_state import OPT_KEYS, capture, load_into

__all__ = ["FILES", "MANIFEST", "NAME", "OPT_KEYS", "STAGED", "CheckpointError", "Checkpointer", "Commit", "DirectFile",
           "Uploader", "Pieces", "capture", "check_storage", "checkpoint_name", "clear", "latest_committed",
           "list_checkpoints", "load_into", "newest_state", "parse", "prune", "read_checkpoint", "read_commit", "stage",
           "write_safetensors"]


def on_host(buffers: dict) -> bool:
    """Whether a capture's copies (``capture``'s ``buffers``) are in host memory."""
    return all(t.device.type == "cpu" for groups in buffers.values() for parts in groups for t in parts)


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
        self._spare: dict | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, engine, model, step: int, loop_state: dict, cursor: dict | None, best: bool = False,
             valid_auc: float | None = None) -> None:
        t, now = time.perf_counter(), time.time()
        spare, self._spare = self._spare, None          # the last capture's buffers, if its files are written
        assemble = capture(engine, model, loop_state, cursor, spare)   # the only part the training loop waits for
        if assemble is not None:
            def staged() -> Path:
                out = stage(self.staging, step, assemble(), best, valid_auc, self.config, now)
                if on_host(assemble.buffers):          # written: the next save may fill them again (host
                    self._spare = assemble.buffers     # memory; device memory is not held between saves)
                return out
            self.uploader.submit(staged)
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
