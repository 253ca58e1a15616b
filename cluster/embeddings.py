"""EmbeddingServer actors: the CF user and item tables, sharded by id, served by batched lookups.

A table of n rows is cut into K contiguous id ranges, one per actor (``bounds = linspace(0, n, K+1)``);
an actor reads only its range from the Parquet file (local path or any ``pyarrow.fs`` URI:
``s3://``, ``gs://``, ``file://``), so no process holds a whole table. Lookups return one contiguous
float32 array. Actors are restartable (``max_restarts``): Ray re-runs ``__init__``, which reloads the
shard from storage, and re-sends calls that were in flight (``max_task_retries``); the client retries
once more on top. For SASRec, user vectors are computed server-side from a history (``user_vectors``).

Dashboard metrics (``ray.util.metrics``; on Ray's Prometheus endpoint with the ``ray_`` prefix):
``cora_embedding_lookups`` (counter, ids served), ``cora_embedding_lookup_rate`` (gauge, ids/s over
the last ~second), ``cora_embedding_lookup_latency_s`` (histogram), tagged with table and shard.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.util.metrics import Counter, Gauge, Histogram

from cora.fileio import is_remote, open_fs, storage_env

LATENCY_BOUNDS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]


class EmbeddingError(ValueError):
    """Bad ids, a missing table or a table whose dimension differs from the configuration."""


def open_table(uri: str):
    """(filesystem, path) for a local path or a storage URI (cora.fileio.open_fs), with a clear error
    when the table is missing."""
    fs, path = open_fs(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise EmbeddingError(f"embedding table {uri} not found; run `cora train-cf` to write it, or fix the path")
    return fs, path


def table_shape(uri: str, key: str) -> tuple[int, int]:
    """(rows, dim) from the Parquet metadata and schema, without reading the vectors."""
    fs, path = open_table(uri)
    f = pq.ParquetFile(path, filesystem=fs)
    field = f.schema_arrow.field("embedding")
    if key not in f.schema_arrow.names or getattr(field.type, "list_size", -1) <= 0:
        raise EmbeddingError(f"{uri}: expected columns {key!r} and 'embedding' (fixed-size float list); "
                             f"found {f.schema_arrow}")
    return f.metadata.num_rows, field.type.list_size


def shard_bounds(rows: int, shards: int) -> np.ndarray:
    if shards < 1 or shards > max(rows, 1):
        raise EmbeddingError(f"cannot cut a table of {rows} rows into {shards} shards; use 1..{rows}")
    return np.linspace(0, rows, shards + 1).astype(np.int64)


def route(key: str, ids: np.ndarray, bounds: np.ndarray, error: type, where: str, source: str) -> list:
    """[(positions in ``ids``, shard)] for the shards whose id ranges [bounds[s], bounds[s + 1]) hold ``ids``;
    an id outside every range raises ``error``, naming it, ``where`` it is missing and the ``source`` that must
    match the data."""
    bad = (ids < 0) | (ids >= bounds[-1])
    if bad.any():
        raise error(f"{key} id {int(ids[bad][0])} is outside {where} (ids 0..{bounds[-1] - 1}); "
                    f"the data and {source} must come from the same prepared directory")
    shard = np.searchsorted(bounds, ids, side="right") - 1
    return [(np.flatnonzero(shard == s), int(s)) for s in np.unique(shard)]


@ray.remote(max_restarts=-1, max_task_retries=3)
class EmbeddingServer:
    """One id range [lo, hi) of one table (``key`` is 'user' or 'item')."""

    def __init__(self, uri: str, key: str, shard: int, lo: int, hi: int, dim: int, cf_dir: str | None = None):
        t0 = time.perf_counter()
        self.key, self.shard, self.lo, self.hi, self.uri = key, shard, lo, hi, uri
        fs, path = open_table(uri)
        table = pq.read_table(path, filesystem=fs, filters=[(key, ">=", lo), (key, "<", hi)])
        got_dim = table.schema.field("embedding").type.list_size
        if got_dim != dim:
            raise EmbeddingError(f"{uri}: embeddings have dimension {got_dim}, the configuration says {dim}; "
                                 f"set the CF dimension to {got_dim} or retrain the CF model")
        ids = table.column(key).to_numpy()
        if len(ids) != hi - lo or not np.array_equal(np.sort(ids), np.arange(lo, hi)):
            raise EmbeddingError(f"{uri}: ids {lo}..{hi - 1} are not all present exactly once "
                                 f"(found {len(ids)} rows in that range)")
        flat = pc.list_flatten(table.column("embedding")).to_numpy().astype(np.float32, copy=False)
        vectors = flat.reshape(len(ids), dim)
        self.table = np.empty_like(vectors)
        self.table[ids - lo] = vectors
        self.sasrec = None
        if cf_dir is not None:
            from cora.cf.train import load_cf
            self.sasrec, _ = load_cf(cf_dir)
            self.sasrec.eval()
        tags = {"table": key, "shard": str(shard)}
        self._lookups = Counter("cora_embedding_lookups", "embedding vectors served", ("table", "shard"))
        self._rate = Gauge("cora_embedding_lookup_rate", "embedding vectors served per second", ("table", "shard"))
        self._latency = Histogram("cora_embedding_lookup_latency_s", "seconds per batched lookup",
                                  LATENCY_BOUNDS, ("table", "shard"))
        for m in (self._lookups, self._rate, self._latency):
            m.set_default_tags(tags)
        self._window, self._window_start = 0, time.perf_counter()
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return {"key": self.key, "shard": self.shard, "lo": self.lo, "hi": self.hi,
                "dim": self.table.shape[1], "load_seconds": self.load_seconds}

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 rows for global ids in [lo, hi)."""
        t0 = time.perf_counter()
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < self.lo) | (ids >= self.hi)
        if bad.any():
            raise EmbeddingError(f"{self.key} id {int(ids[bad][0])} is outside this shard's range "
                                 f"{self.lo}..{self.hi - 1} (table {self.uri})")
        out = self.table[ids - self.lo]
        self._observe(len(ids), time.perf_counter() - t0)
        return out

    def user_vectors(self, history: np.ndarray) -> np.ndarray:
        """SASRec: (B, dim) user vectors from (B, L) left-padded item histories (-1 = padding)."""
        if self.sasrec is None:
            raise EmbeddingError("user_vectors needs a SASRec CF model; this server was started without one")
        import torch
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.sasrec.user_vectors_from_history(torch.as_tensor(history, dtype=torch.long)).numpy()
        self._observe(len(history), time.perf_counter() - t0)
        return out.astype(np.float32, copy=False)

    def _observe(self, n: int, seconds: float) -> None:
        self._lookups.inc(n)
        self._latency.observe(seconds)
        self._window += n
        now = time.perf_counter()
        if now - self._window_start >= 1.0:
            self._rate.set(self._window / (now - self._window_start))
            self._window, self._window_start = 0, now

    def pid(self) -> int:
        import os
        return os.getpid()


class EmbeddingClient:
    """Routes batched lookups to the servers of each table and reassembles them in request order.

    Picklable: InteractionShard actors and trainer workers each hold a copy (the handles only)."""

    def __init__(self, servers: dict[str, list], bounds: dict[str, np.ndarray], dim: dict[str, int]):
        self.servers, self.bounds, self.dim = servers, bounds, dim

    def lookup_async(self, key: str, ids: np.ndarray):
        """Start the lookups; returns a callable that waits and gives the (len(ids), dim) array."""
        ids = np.asarray(ids, dtype=np.int64)
        parts = route(key, ids, self.bounds[key], EmbeddingError, "the table", "the CF model")
        refs = [self.servers[key][s].lookup.remote(ids[pos]) for pos, s in parts]

        def wait() -> np.ndarray:
            out = np.empty((len(ids), self.dim[key]), dtype=np.float32)
            for (pos, _), vectors in zip(parts, _get_retrying(refs, parts, self.servers[key], ids)):
                out[pos] = vectors
            return out
        return wait

    def lookup(self, key: str, ids: np.ndarray) -> np.ndarray:
        return self.lookup_async(key, ids)()

    def user_vectors(self, history: np.ndarray) -> np.ndarray:
        server = self.servers["user"][0]
        return _retry(lambda: ray.get(server.user_vectors.remote(history)))


def _get_retrying(refs, parts, servers, ids):
    try:
        return ray.get(refs)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        # the actor died and its in-flight calls were not retried: ask again (it restarts itself)
        return [_retry(lambda pos=pos, s=s: ray.get(servers[s].lookup.remote(ids[pos]))) for pos, s in parts]


def _retry(call, attempts: int = 5, wait: float = 0.5):
    for k in range(attempts):
        try:
            return call()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            if k == attempts - 1:
                raise
            time.sleep(wait * (2 ** k))


def server_options(cf_dir: str, num_cpus: float, memory: int | None = None) -> dict:
    """The EmbeddingServer actors' Ray options: from object storage, this process's endpoint and region
    (``storage_env``: no credentials, which each node has in its own environment or role)."""
    opts: dict = {"num_cpus": num_cpus}
    if is_remote(cf_dir):
        opts["runtime_env"] = {"env_vars": storage_env()}
    if memory:
        opts["memory"] = memory
    return opts


def start_embedding_servers(cf_dir: str, shards: int = 1, dim: int | None = None, num_cpus: float = 0.5,
                            memory_per_shard: int | None = None, sasrec: bool = False) -> EmbeddingClient:
    """K servers per table from ``cf_dir`` (``user_embeddings.parquet``, ``item_embeddings.parquet``).

    ``dim``: the CF dimension the configuration expects (checked against the tables)."""
    servers, bounds, dims = {}, {}, {}
    for key in ("user", "item"):
        uri = f"{cf_dir.rstrip('/')}/{key}_embeddings.parquet"
        rows, table_dim = table_shape(uri, key)
        if dim is not None and table_dim != dim:
            raise EmbeddingError(f"{uri}: embeddings have dimension {table_dim}, the configuration says {dim}; "
                                 f"set the CF dimension to {table_dim} or retrain the CF model")
        bounds[key], dims[key] = shard_bounds(rows, shards), table_dim
        opts = server_options(cf_dir, num_cpus, memory_per_shard)
        servers[key] = [EmbeddingServer.options(**opts).remote(
            uri, key, s, int(bounds[key][s]), int(bounds[key][s + 1]), table_dim,
            cf_dir if (sasrec and key == "user") else None) for s in range(shards)]
    # fail here, with the actor's own message, if a shard cannot load
    ray.get([a.info.remote() for group in servers.values() for a in group])
    return EmbeddingClient(servers, bounds, dims)
