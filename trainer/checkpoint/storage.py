"""Checkpoint storage: list, verify, read, prune and clear the committed checkpoints under a URI (a
path, file://, s3:// with CORA_S3_ENDPOINT, gs://). A checkpoint is committed by its manifest, written
last; nothing is unpickled on load (safetensors and JSON only)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from cora.fileio import bytes_problem, is_remote, open_fs

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
NAME = re.compile(r"step-\d{9}")
STAGED = "staged.json"          # written last into a staging directory: the staged files are complete


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (not committed, damaged, or for another model or run)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def _log(msg: str) -> None:
    print(f"[checkpoint] {msg}", file=sys.stderr, flush=True)


def list_checkpoints(uri: str) -> list[str]:
    """Names of the step-* directories under ``uri`` (committed or not), oldest first."""
    fs, root = open_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and NAME.fullmatch(i.base_name))


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_commit(uri: str, name: str) -> dict:
    """The manifest.json that commits checkpoint ``name`` (CheckpointError when it was never committed)."""
    fs, root = open_fs(uri)
    try:
        return json.loads(_read(fs, f"{root}/{name}/{MANIFEST}"))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}/{name} has no {MANIFEST}: it was never committed") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{uri}/{name}/{MANIFEST} is not valid JSON ({e})") from None


def read_checkpoint(uri: str, name: str) -> tuple[dict, dict[str, bytes]]:
    """(manifest, file bytes) of a committed checkpoint, every file checked against the manifest."""
    manifest = read_commit(uri, name)
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
        problem = bytes_problem(data, meta)
        if problem:
            raise CheckpointError(f"{uri}/{name}/{fname} {problem}")
        files[fname] = data
    return manifest, files


def newest_state(uri: str) -> tuple[str, dict] | None:
    """(name, state.json) of the newest committed checkpoint whose state.json matches its manifest (the
    small file only: what the driver needs to plan a resume); None when there is none."""
    fs, root = open_fs(uri)
    for name in reversed(list_checkpoints(uri)):
        try:
            entry = read_commit(uri, name).get("files", {})["state.json"]
            data = _read(fs, f"{root}/{name}/state.json")
            if bytes_problem(data, entry) is None:
                return name, json.loads(data)
        except (CheckpointError, KeyError, FileNotFoundError, json.JSONDecodeError):
            pass
    return None


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
            manifests[n] = read_commit(uri, n)
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


