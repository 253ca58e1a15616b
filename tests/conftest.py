"""Fixtures shared across the test packages."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# Storage credentials of this machine, as a cluster node has them in its environment: set before any test
# starts Ray, so that every Ray process inherits them (moto accepts any). They must never travel through a
# runtime_env (shown in the dashboard): tests/cluster/test_credentials.py looks for these values there.
TEST_SECRETS = {"AWS_ACCESS_KEY_ID": "cora-test-key-id-5f1c", "AWS_SECRET_ACCESS_KEY": "cora-test-secret-9d2e7a41b8"}
os.environ.update(TEST_SECRETS)
os.environ.pop("AWS_SESSION_TOKEN", None)

# Logical CPUs of the tests' local Ray instance (whichever test starts it first). Ray's CPU counts are
# reservations, not cores: generous, so that actors left by earlier tests never starve a worker group.
TEST_CPUS = 32


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, with the storage environment
    (CORA_S3_ENDPOINT, region) pointing at it; the credentials are TEST_SECRETS, set for the whole session
    (a Ray instance started before this fixture has them too). Yields (endpoint, process)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}")
            time.sleep(0.2)
    env = {"CORA_S3_ENDPOINT": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint, proc
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()
    proc.wait()


def write_tallrec_export(out, cf_dim: int = 8, seed: int = 1, llm: str = "tiny-llama", **injection) -> dict:
    """A TALLRec run's export (RUN/export) with random non-zero LoRA A and P, as CoLLM's first stage
    (collm.lora_from) reads it; returns the exported tensors."""
    import torch

    from cora.export import build_model
    from trainer.evaluate import export_trainable
    config = {"method": "tallrec", "llm": {"name": llm}, "injection": dict(injection), "generator": {},
              "cf_dim": cf_dim}
    model, _ = build_model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.injection.modules:
            m.lora_P.copy_(torch.randn(m.lora_P.shape, generator=g) * 0.05)
    state = {n: p.detach().clone() for n, p in model.method.exported(model).items()}
    export_trainable(state, out, config)
    return state
