"""The trainer side of the data path: an iterator over one rank's ready batches, timing the waits.

``in_flight`` requests (default 2) are kept outstanding (the next batches are asked for before the
current one is returned; the actor answers them in call order), so the trainer waits only when the
InteractionShard actor's prefetch queue has run dry, not for a round trip. ``wait_seconds``
is the total time ``next()`` blocked; ``cursor()`` is the position to save with a checkpoint: it
counts batches handed to the trainer, never those merely prefetched.
"""

from __future__ import annotations

import time
from collections import deque

import ray

from .plan import Cursor


class BatchIterator:
    def __init__(self, actor, epoch: int, cursor: Cursor | None = None, in_flight: int = 2):
        self.actor, self.epoch = actor, epoch
        self.info = ray.get(actor.describe.remote())
        skip = 0
        if cursor is not None:
            self._check(cursor)
            if cursor.epoch != epoch:
                raise ValueError(f"cursor is for epoch {cursor.epoch}, not {epoch}")
            skip = cursor.delivered
        self.consumed = self._first = skip // self.info["batch_size"]
        self.remaining = ray.get(actor.start_epoch.remote(epoch, skip))
        self.wait_seconds, self.waits = 0.0, []
        self.in_flight = max(1, in_flight)
        self._refs = deque(actor.next_batch.remote() for _ in range(min(self.in_flight, self.remaining)))
        self._asked = len(self._refs)

    def _check(self, c: Cursor) -> None:
        i = self.info
        mismatch = {k: (getattr(c, k), i[k]) for k in ("world_size", "batch_size", "seed", "shards") if getattr(c, k) != i[k]}
        if mismatch:
            raise ValueError(f"cannot resume rank {i['rank']} from this cursor: "
                             + ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in mismatch.items())
                             + "; resume with the same data, seed, batch size and number of workers")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._refs:
            raise StopIteration
        t0 = time.perf_counter()
        batch = ray.get(self._refs.popleft())
        waited = time.perf_counter() - t0
        if batch is None:
            self._refs.clear()
            raise StopIteration
        self.wait_seconds += waited
        self.waits.append(waited)
        self.consumed += 1
        if self._asked < self.remaining + 1:     # + 1: the call that returns the end of the epoch
            self._refs.append(self.actor.next_batch.remote())
            self._asked += 1
        return batch

    def __len__(self) -> int:
        return self.remaining

    @property
    def exhausted(self) -> bool:
        """Every batch of the epoch has been handed over."""
        return self.consumed - self._first >= self.remaining

    def cursor(self) -> Cursor:
        i = self.info
        # batch slots handed over (a whole number of batches; the last batch of an epoch may be short)
        return Cursor(epoch=self.epoch, delivered=self.consumed * i["batch_size"], seed=i["seed"], world_size=i["world_size"],
                      batch_size=i["batch_size"], shards=i["shards"], rng={"seed": [i["seed"], self.epoch, i["rank"]]})
