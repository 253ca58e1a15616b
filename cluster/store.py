"""BDLM's shared store as Ray actors: the user and item embedding tables that the LLM and the domain model
both read and write (``cora.bdlm``), sharded by id like the EmbeddingServers.

A table of n rows is cut into K contiguous id ranges (``bounds = linspace(0, n, K+1)``), one
``EmbeddingStore`` actor per range, each holding a ``cora.bdlm.StoreShard``. Each training step every rank
pushes its gradients (possibly none) to every shard (``StoreClient.push``); a shard applies the step once
all ranks' pushes for it arrived, in rank order, and its ``version`` becomes that step. Reads, snapshots and
the tables name the step they must come after (``after``) and wait until the shard applied it, so what a
rank reads for step s + 1 always holds step s's update, however the ranks' calls interleave (the actors are
asyncio actors: a waiting call does not block the others).

Not restartable (no ``max_restarts``): a shard's state exists only in it and in the checkpoints, so a
store actor that dies fails the run, which resumes from its newest checkpoint (``run.resume=auto``), where
the store's state is saved (``snapshot``/``load``).
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from cora.bdlm import StoreShard, initial_tables

from .embeddings import shard_bounds

WAIT_S = 600.0
"""How long a read waits for a step to be applied before it fails (a rank that never pushed)."""


@ray.remote
class EmbeddingStore:
    """The rows [lo, hi) of table ``key`` ('user' or 'item') of the store, initialised from ``cf_dir``."""

    def __init__(self, cf_dir: str, key: str, lo: int, hi: int, world: int, lr: float, optimizer: str):
        self.cf_dir, self.key, self.lo, self.hi = cf_dir, key, lo, hi
        base, teacher = self._initial()
        self.shard = StoreShard(key, lo, hi, base, teacher, world, lr, optimizer)
        self._cond: asyncio.Condition | None = None

    def _initial(self) -> tuple[np.ndarray, np.ndarray]:
        base, teacher = initial_tables(self.cf_dir)[self.key]
        return base[self.lo:self.hi], teacher[self.lo:self.hi]

    def _changed(self) -> asyncio.Condition:
        if self._cond is None:                    # created in the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def _after(self, step: int) -> None:
        cond = self._changed()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.shard.version >= step), WAIT_S)
            except asyncio.TimeoutError:
                raise TimeoutError(f"store {self.key} {self.lo}..{self.hi - 1}: step {step} was not applied within "
                                   f"{WAIT_S:.0f} s (it is at step {self.shard.version}, with pushes from ranks "
                                   f"{sorted(self.shard.pending)}): a rank did not push") from None

    async def _notify(self) -> None:
        cond = self._changed()
        async with cond:
            cond.notify_all()

    async def info(self) -> dict:
        return {"key": self.key, "lo": self.lo, "hi": self.hi, "dim": self.shard.table.shape[1],
                "version": self.shard.version}

    async def read(self, ids: np.ndarray, after: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        """(E rows, teacher rows, version) of ``ids`` once step ``after`` is applied."""
        await self._after(after)
        return self.shard.read(ids)

    async def push(self, step: int, rank: int, ids: np.ndarray, grads: np.ndarray, records=None) -> bool:
        applied = self.shard.push(step, rank, ids, grads, records)
        if applied:
            await self._notify()
        return applied

    async def snapshot(self, after: int = 0) -> dict[str, np.ndarray]:
        await self._after(after)
        return self.shard.snapshot()

    async def recorded(self, after: int = 0) -> tuple:
        await self._after(after)
        return self.shard.recorded()

    async def load(self, state: dict[str, np.ndarray]) -> int:
        self.shard.load(state)
        await self._notify()
        return self.shard.version

    async def reset(self) -> int:
        """Back to the CF run's tables at step 0 (a fresh start)."""
        self.shard.reset(*self._initial())
        await self._notify()
        return 0

    async def assign(self, base: np.ndarray, teacher: np.ndarray, after: int = 0) -> None:
        await self._after(after)
        self.shard.assign(base, teacher)


class StoreClient:
    """Routes reads and pushes to the shards of each table, reassembles them in request order, and gathers
    and scatters whole-store states (``snapshot``/``load``). Picklable (the handles only): the driver hands
    it to every rank."""

    KEYS = ("user", "item")
    FIELDS = ("table", "m", "v", "t", "teacher")
    """Per-row state of a snapshot, concatenated over a table's shards in id order."""

    def __init__(self, shards: dict[str, list], bounds: dict[str, np.ndarray], dim: int):
        self.shards, self.bounds, self.dim = shards, bounds, dim

    @property
    def sizes(self) -> dict[str, int]:
        return {k: int(self.bounds[k][-1]) for k in self.KEYS}

    def _parts(self, key: str, ids: np.ndarray) -> list[tuple[np.ndarray, int]]:
        from .embeddings import route
        return route(key, np.asarray(ids, dtype=np.int64), self.bounds[key], ValueError, "the store", "data.cf_dir")

    def read(self, key: str, ids: np.ndarray, after: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(E rows (k, d), teacher rows (k, d)) of ``ids`` of table ``key``, with step ``after`` applied."""
        ids = np.asarray(ids, dtype=np.int64)
        parts = self._parts(key, ids)
        got = ray.get([self.shards[key][s].read.remote(ids[pos], after) for pos, s in parts])
        rows, teacher = np.empty((len(ids), self.dim), np.float32), np.empty((len(ids), self.dim), np.float32)
        for (pos, _), (r, t, _) in zip(parts, got):
            rows[pos], teacher[pos] = r, t
        return rows, teacher

    def push(self, step: int, rank: int, grads: dict[str, tuple[np.ndarray, np.ndarray]], records=None) -> None:
        """Rank ``rank``'s step: {key: (ids (k,), gradients (k, d))} to every shard (an empty push where it has
        none, so that every shard counts every rank), and its records (users, items, logits) to the user
        shards of their users."""
        refs = []
        for key in self.KEYS:
            ids, g = grads.get(key, (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)))
            ids = np.asarray(ids, dtype=np.int64)
            owner = np.searchsorted(self.bounds[key], ids, side="right") - 1
            rec_owner = None
            if key == "user" and records is not None:
                rec_owner = np.searchsorted(self.bounds[key], np.asarray(records[0]), side="right") - 1
            for s, actor in enumerate(self.shards[key]):
                mine = owner == s
                rec = None if rec_owner is None else tuple(np.asarray(r)[rec_owner == s] for r in records)
                refs.append(actor.push.remote(step, rank, ids[mine], np.asarray(g)[mine], rec))
        ray.get(refs)

    def snapshot(self, after: int = 0) -> dict[str, np.ndarray]:
        """The whole store: per table its FIELDS (all rows), its records and its version."""
        out = {}
        for key in self.KEYS:
            parts = ray.get([a.snapshot.remote(after) for a in self.shards[key]])
            for f in self.FIELDS:
                out[f"{key}.{f}"] = np.concatenate([p[f] for p in parts])
            out[f"{key}.version"] = np.concatenate([p["version"] for p in parts])
            if key == "user":
                for f in ("rec_users", "rec_items", "rec_logits"):
                    out[f] = np.concatenate([p[f] for p in parts])
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Put a ``snapshot`` back (each shard its rows, and the user shards the records of their users)."""
        refs = []
        for key in self.KEYS:
            b = self.bounds[key]
            owner = np.searchsorted(b, np.asarray(state["rec_users"]), side="right") - 1
            for s, actor in enumerate(self.shards[key]):
                part = {f: np.asarray(state[f"{key}.{f}"])[b[s]:b[s + 1]] for f in self.FIELDS}
                part["version"] = np.asarray(state[f"{key}.version"])[s:s + 1]
                mine = owner == s if key == "user" else np.zeros(len(owner), bool)
                part.update({f: np.asarray(state[f])[mine] for f in ("rec_users", "rec_items", "rec_logits")})
                refs.append(actor.load.remote(part))
        ray.get(refs)

    def reset(self) -> None:
        ray.get([a.reset.remote() for key in self.KEYS for a in self.shards[key]])

    def tables(self, after: int = 0) -> dict[str, np.ndarray]:
        """{"user", "item"}: E; {"teacher_user", "teacher_item"}: T (all rows)."""
        snap = self.snapshot(after)
        out = {k: snap[f"{k}.table"] for k in self.KEYS}
        return dict(out, **{f"teacher_{k}": snap[f"{k}.teacher"] for k in self.KEYS})

    def recorded(self, after: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, logits) of every pair the LLM recorded, sorted by (user, item)."""
        parts = ray.get([a.recorded.remote(after) for a in self.shards["user"]])
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))

    def assign(self, tables: dict[str, np.ndarray], after: int = 0) -> None:
        """New E and T for every row (the domain phase's result)."""
        refs = []
        for key in self.KEYS:
            b = self.bounds[key]
            refs += [a.assign.remote(tables[key][b[s]:b[s + 1]], tables[f"teacher_{key}"][b[s]:b[s + 1]], after)
                     for s, a in enumerate(self.shards[key])]
        ray.get(refs)


def start_store(cf_dir: str, world: int, shards: int = 1, lr: float = 1e-3, optimizer: str = "adam",
                num_cpus: float = 0.1) -> StoreClient:
    """``shards`` EmbeddingStore actors per table, initialised from the CF run in ``cf_dir``, for ``world`` ranks."""
    from cora.fileio import is_remote, storage_env

    from .embeddings import table_shape
    handles, bounds, dim = {}, {}, None
    opts = {"num_cpus": num_cpus}
    if is_remote(cf_dir):
        opts["runtime_env"] = {"env_vars": storage_env()}
    for key in StoreClient.KEYS:
        rows, dim = table_shape(f"{cf_dir.rstrip('/')}/{key}_embeddings.parquet", key)
        try:
            bounds[key] = shard_bounds(rows, shards)
        except ValueError as e:
            raise ValueError(f"bdlm.store_shards={shards}: {e} (the {key} table)") from None
        handles[key] = [EmbeddingStore.options(**opts).remote(cf_dir, key, int(bounds[key][s]), int(bounds[key][s + 1]),
                                                              world, lr, optimizer) for s in range(shards)]
    ray.get([a.info.remote() for group in handles.values() for a in group])    # fail here if a shard cannot load
    return StoreClient(handles, bounds, dim)
