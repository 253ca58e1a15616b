"""Checkpoint storage without a worker group: commit by manifest, verification, pruning, retries
through a storage outage, and no unpickling on load. S3 is moto's server on 127.0.0.1."""

import hashlib
import json
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from cora.fileio import open_fs
from tests.conftest import free_port
from trainer import checkpoint as ck


def parts(step: int, scale: float = 1.0):
    """A small captured state in the shapes capture() produces."""
    g = torch.Generator().manual_seed(step)
    trainable = {"generator.w": torch.randn(4, 3, generator=g) * scale, "p.lora_P": torch.randn(5, 2, generator=g)}
    opt = {f"{n}::{k}": torch.rand(t.shape, generator=g) for n, t in trainable.items() for k in ck.OPT_KEYS}
    rng = {"rank0": torch.get_rng_state(), "rank1": torch.get_rng_state()}
    state = {"loop": {"step": step, "epoch": 0}, "cursors": [None, None], "world_size": 2, "adam_steps": [step],
             "scheduler": {"last_epoch": step}, "global_steps": step, "global_samples": 8 * step, "micro_steps": step}
    return trainable, opt, rng, state


def commit(uri, staging, steps, keep_last=10, best=()):
    up = ck.Uploader(uri, keep_last, backoff=(0.05, 0.2))
    for s in steps:
        up.submit(ck.stage(staging, s, parts(s), best=s in best, valid_auc=None, config={"seed": 0}))
    up.close()
    return up


@pytest.fixture(params=["local", "s3"])
def uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    request.getfixturevalue("s3_server")
    fs, _ = open_fs("s3://ckpt-bucket", create_buckets=True)
    fs.create_dir("ckpt-bucket")
    return f"s3://ckpt-bucket/{tmp_path.name}/run"


def test_commit_verify_and_load_back_exactly(uri, tmp_path):
    up = commit(uri, tmp_path / "staging", [3, 6])
    assert [c.name for c in up.commits] == ["step-000000003", "step-000000006"]
    assert not list((tmp_path / "staging").iterdir())              # staged copies go once committed
    name, manifest, files = ck.latest_committed(uri)
    assert name == "step-000000006" and manifest["step"] == 6 and set(manifest["files"]) == set(ck.FILES)
    assert manifest["files_version"] == 2 and all(set(manifest["files"][f]) == {"size", "xxh3_128"} for f in
                                                  ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"))
    trainable, opt, rng, state = ck.parse(files)
    want = parts(6)
    for got, ref in zip((trainable, opt, rng), want[:3]):
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert state["loop"] == want[3]["loop"] and state["config"] == {"seed": 0}
    fs, root = open_fs(uri)
    with fs.open_input_stream(f"{root}/{name}/manifest.json") as f:
        manifest_bytes = len(f.read())
    assert up.commits[-1].bytes == sum(m["size"] for m in manifest["files"].values()) + manifest_bytes


def test_missing_manifest_or_damaged_files_are_never_loaded(uri, tmp_path):
    commit(uri, tmp_path / "staging", [2, 4, 6, 8])
    fs, root = open_fs(uri)
    fs.delete_file(f"{root}/step-000000008/manifest.json")                      # never committed
    with fs.open_input_stream(f"{root}/step-000000006/trainable.safetensors") as f:
        data = f.read()
    with fs.open_output_stream(f"{root}/step-000000006/trainable.safetensors") as f:
        f.write(data[:-10])                                                      # truncated
    with fs.open_input_stream(f"{root}/step-000000004/state.json") as f:
        state = f.read()
    assert b'"step": 4' in state
    with fs.open_output_stream(f"{root}/step-000000004/state.json") as f:
        f.write(state.replace(b'"step": 4', b'"step": 9'))                       # altered, same size
    warnings = []
    name, _, files = ck.latest_committed(uri, warn=warnings.append)
    assert name == "step-000000002" and ck.parse(files)[3]["loop"]["step"] == 2
    assert len(warnings) == 3
    assert "step-000000008" in warnings[0] and "never committed" in warnings[0]
    assert "step-000000006/trainable.safetensors" in warnings[1] and "truncated" in warnings[1]
    assert "step-000000004/state.json does not match the sha256" in warnings[2]


class Exploit:
    """Unpickling this creates a marker file: what a crafted checkpoint would do to a pickle loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_crafted_to_run_code_when_unpickled_runs_nothing(tmp_path):
    uri, marker = str(tmp_path / "ckpt"), tmp_path / "pwned"
    commit(uri, tmp_path / "staging", [5])
    payload = pickle.dumps(Exploit(str(marker)))
    d = tmp_path / "ckpt" / "step-000000005"
    (d / "trainable.safetensors").write_bytes(payload)                # a pickle where tensors belong ...
    manifest = json.loads((d / "manifest.json").read_text())         # ... with a manifest that vouches for it
    manifest["files"]["trainable.safetensors"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(manifest))
    warnings = []
    assert ck.latest_committed(uri, warn=warnings.append) is None
    assert "unreadable checkpoint file" in warnings[0] and not marker.exists()
    pickle.loads(payload)                                            # the payload is real: a pickle loader would run it
    assert marker.exists()


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    uri = str(tmp_path / "ckpt")
    commit(uri, tmp_path / "staging", [1, 2, 3, 4, 5, 6], keep_last=2, best=(2,))
    assert ck.list_checkpoints(uri) == ["step-000000002", "step-000000005", "step-000000006"]
    assert ck.read_commit(uri, "step-000000002")["best"] is True


def test_storage_that_cannot_be_reached_fails_fast_with_the_uri(tmp_path):
    port = free_port()
    os.environ["CORA_S3_ENDPOINT"], saved = f"http://127.0.0.1:{port}", os.environ.get("CORA_S3_ENDPOINT")
    try:
        t = time.time()
        with pytest.raises(RuntimeError, match=r"cannot write checkpoints to s3://nowhere/run"):
            ck.check_storage("s3://nowhere/run")
        assert time.time() - t < 30
    finally:
        os.environ.pop("CORA_S3_ENDPOINT") if saved is None else os.environ.update(CORA_S3_ENDPOINT=saved)


class Outage:
    """A TCP proxy in front of the S3 server that can be taken down (connections refused) and back."""

    def __init__(self, target_port: int):
        self.port, self.target, self.up = free_port(), target_port, True
        self._listener = None
        self.start()

    def start(self):
        self.up = True
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self):
        self.up = False
        self._listener.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while self.up and (data := a.recv(65536)):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_uploads_retry_through_a_storage_outage_and_lose_nothing(s3_server, tmp_path):
    endpoint, _ = s3_server
    proxy = Outage(int(endpoint.rsplit(":", 1)[1]))
    os.environ["CORA_S3_ENDPOINT"] = f"http://127.0.0.1:{proxy.port}"
    fs, _ = open_fs("s3://outage", create_buckets=True)
    fs.create_dir("outage")
    uri, staging = "s3://outage/run", tmp_path / "staging"
    up = ck.Uploader(uri, keep_last=10, backoff=(0.1, 0.5))
    up.submit(ck.stage(staging, 1, parts(1), best=False, valid_auc=None, config={}))
    up.flush()
    proxy.stop()                                                      # the server goes away ...
    t = time.time()
    up.submit(ck.stage(staging, 2, parts(2), best=False, valid_auc=None, config={}))
    time.sleep(3)
    assert time.time() - t < 3.5                                      # submit() did not wait for storage
    assert (staging / "step-000000002" / "trainable.safetensors").is_file()   # kept while uncommitted
    assert len(up.commits) == 1
    proxy.start()                                                     # ... and comes back
    up.close()
    assert [c.name for c in up.commits] == ["step-000000001", "step-000000002"]
    assert up.commits[1].request_to_commit_s >= 3.0          # committed after the outage (retried by the SDK or us)
    assert not (staging / "step-000000002").exists()
    name, _, files = ck.latest_committed(uri)
    assert name == "step-000000002" and torch.equal(ck.parse(files)[0]["generator.w"], parts(2)[0]["generator.w"])


def test_a_staged_checkpoint_left_by_a_crash_is_committed_by_the_next_attempt(tmp_path):
    uri, staging = str(tmp_path / "ckpt"), tmp_path / "staging"
    ck.stage(staging, 7, parts(7), best=False, valid_auc=None, config={})     # staged, then the process died
    half = ck.stage(staging, 8, parts(8), best=False, valid_auc=None, config={})
    (half / ck.STAGED).unlink()                                               # died while staging this one
    up = ck.Uploader(uri, keep_last=3)
    assert [p.name for p in up.resubmit(staging)] == ["step-000000007"]
    up.close()
    assert ck.latest_committed(uri)[0] == "step-000000007"


def test_storage_errors_are_retried_with_growing_back_off(tmp_path):
    up = ck.Uploader(str(tmp_path / "ckpt"), keep_last=1, backoff=(0.05, 0.1))
    calls = []

    def flaky():
        calls.append(time.perf_counter())
        if len(calls) < 4:
            raise OSError("connection refused")

    assert up._retry("uploading x", flaky) == 3
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.1 and gaps[2] < 1.0     # doubled, then capped
    up.close()


def direct_io_works(folder) -> bool:
    """Whether the filesystem of ``folder`` takes an aligned O_DIRECT write (probed here with plain os calls)."""
    import mmap
    probe = Path(folder, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    try:
        block = mmap.mmap(-1, 4096)
        os.write(fd, block)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("direct, buffer_bytes", [(True, 16 << 20), (True, 4096), (False, 8192)])
def test_tensors_are_streamed_to_safetensors_from_their_pieces_with_the_manifest_entry(tmp_path, direct, buffer_bytes):
    """write_safetensors: a file safetensors reads back exactly (pieces concatenated and cut as given, every dtype a
    checkpoint holds), whose size and xxh3-128 are those of its bytes, written direct (no page cache) exactly where
    the filesystem takes O_DIRECT, or buffered when asked; with a buffer of one 4 KiB block the stream crosses
    many buffer ends and the last block is padded and cut. A piece list that does not fill its shape is
    refused, as is a dtype safetensors has no name for."""
    from safetensors.torch import load

    from cora.fileio import file_entry
    g = torch.Generator().manual_seed(0)
    flat = [torch.randn(7, generator=g), torch.randn(7, generator=g)]
    tensors = {"w": ck.Pieces((3, 4), [flat[0], flat[1][:5]]), "rng": torch.get_rng_state(),
               "half": torch.randn(2, 3, generator=g).to(torch.bfloat16), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "big": torch.randn(3001, generator=g)}
    out = ck.DirectFile(tmp_path / "mode", buffer_bytes, direct)
    out.write(b"x" * 5000)
    assert out.close() == file_entry(b"x" * 5000, "xxh3_128") and (tmp_path / "mode").read_bytes() == b"x" * 5000
    assert out.direct == (direct and direct_io_works(tmp_path))
    entry = ck.write_safetensors(tmp_path / "t.safetensors", tensors, buffer_bytes, direct)
    data = (tmp_path / "t.safetensors").read_bytes()
    assert entry == file_entry(data, "xxh3_128") and int.from_bytes(data[:8], "little") % 8 == 0
    back = load(data)
    assert torch.equal(back["w"], torch.cat([flat[0], flat[1][:5]]).view(3, 4))
    for name in ("rng", "half", "scalar", "empty"):
        assert back[name].dtype == tensors[name].dtype and torch.equal(back[name], tensors[name])
    with pytest.raises(ValueError, match="pieces of 40 bytes for shape \\[3, 4\\]"):
        ck.write_safetensors(tmp_path / "bad", {"w": ck.Pieces((3, 4), [flat[0], flat[1][:3]])})
    with pytest.raises(TypeError, match="cannot write 'c'"):
        ck.write_safetensors(tmp_path / "bad", {"c": torch.zeros(2, dtype=torch.complex64)})
