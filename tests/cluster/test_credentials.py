"""Storage credentials stay out of the Ray dashboard: no runtime_env this project sets (the job's, the
EmbeddingServers', the Ray Train workers') carries a secret, yet the actors and workers reach moto's S3
server with the credentials of their node's environment (tests/conftest.py's TEST_SECRETS, set before Ray
started, as `./launch.sh head/worker` passes a node's environment to its Ray processes)."""

import json

import numpy as np
import pyarrow.fs as pafs
import ray

from cluster.embeddings import server_options, start_embedding_servers
from cora.fileio import SECRET_ENV, open_fs
from tests.conftest import TEST_SECRETS


def leaked(env) -> list[str]:
    """The secret values (and secret variable names) found anywhere in a runtime env."""
    text = json.dumps(env, default=str)
    return [v for v in TEST_SECRETS.values() if v in text] + [k for k in SECRET_ENV if k in text]


def probe(config):
    """A Ray Train worker loop: write this worker's runtime env and what it read from the bucket to a file."""
    from pathlib import Path

    from cora.fileio import read_bytes
    env = dict(ray.get_runtime_context().runtime_env)
    Path(config["out"]).write_text(json.dumps({"env": env, "read": read_bytes(config["uri"]).decode()}, default=str))


def test_no_secret_travels_in_a_runtime_env_and_the_storage_is_reached_anyway(ray_local, cf_dir, s3_server, tmp_path):
    from trainer.config import TrainConfig
    from trainer.worker import trainer_for
    endpoint, _ = s3_server
    out, users, _ = cf_dir
    fs, bucket = open_fs("s3://creds-bucket", create_buckets=True)
    fs.create_dir(bucket)
    for name in ("user_embeddings.parquet", "item_embeddings.parquet"):
        pafs.copy_files(str(out / name), f"{bucket}/cf/{name}", destination_filesystem=fs)
    with fs.open_output_stream(f"{bucket}/probe.txt") as f:
        f.write(b"reached")
    # the job (this driver) and the EmbeddingServers, which read the tables from S3
    assert leaked(ray.get_runtime_context().runtime_env) == []
    opts = server_options("s3://creds-bucket/cf", num_cpus=0.1)
    assert opts["runtime_env"]["env_vars"]["CORA_S3_ENDPOINT"] == endpoint and leaked(opts) == []
    client = start_embedding_servers("s3://creds-bucket/cf", shards=1, dim=8, num_cpus=0.1)
    np.testing.assert_array_equal(client.lookup("user", np.arange(len(users))), users)
    for handle in [a for group in client.servers.values() for a in group]:
        ray.kill(handle)
    # the Ray Train workers, started exactly as `cora train` starts them
    cfg = TrainConfig()
    cfg.run.workers = 1
    seen = tmp_path / "probe.json"
    trainer_for(cfg, probe, {"uri": "s3://creds-bucket/probe.txt", "out": str(seen)}, str(tmp_path / "ray"),
                "probe").fit()
    got = json.loads(seen.read_text())
    assert got["env"]["env_vars"]["CORA_S3_ENDPOINT"] == endpoint and leaked(got["env"]) == []
    assert got["read"] == "reached"                          # with the node's credentials
