import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from cluster import runtime
from tests.conftest import TEST_CPUS
from cora.cf.store import embedding_table
from trainer.cli import main


@pytest.fixture(scope="session")
def ray_local():
    runtime.init(num_cpus=TEST_CPUS)
    yield
    ray.shutdown()


def write_table(path, key: str, vectors: np.ndarray, order=None) -> None:
    """An embedding table as `cora train-cf` writes it (rows optionally stored in another order)."""
    table = embedding_table(key, vectors)
    pq.write_table(table if order is None else table.take(pa.array(order)), path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared synthetic dataset: 1000 interactions, shards of 60 samples."""
    out = tmp_path_factory.mktemp("cluster") / "data"
    rc = main(["prepare", "--source", "synthetic", "--out", str(out), "--users", "50", "--items", "40",
               "--interactions", "1000", "--samples-per-shard", "60", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def cf_dir(tmp_path_factory, data_dir):
    """Random CF tables with the dataset's sizes (what the data path serves, not their quality)."""
    import json
    ds = json.loads((data_dir / "dataset.json").read_text())
    out = tmp_path_factory.mktemp("cf")
    rng = np.random.default_rng(0)
    users = rng.standard_normal((ds["num_users"], 8)).astype(np.float32)
    items = rng.standard_normal((ds["num_items"], 8)).astype(np.float32)
    write_table(out / "user_embeddings.parquet", "user", users, rng.permutation(len(users)))
    write_table(out / "item_embeddings.parquet", "item", items)
    return out, users, items


def pytest_collection_modifyitems(items):
    """Everything here but the pure planning tests starts Ray: mark it slow."""
    for item in items:
        if "tests/cluster/" in str(item.fspath) and not item.fspath.basename == "test_plan.py":
            item.add_marker(pytest.mark.slow)
