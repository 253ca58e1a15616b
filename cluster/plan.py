"""Which samples each trainer rank sees in an epoch: exactly once, balanced, deterministic, resumable.

Rank r's InteractionShard actor owns the shard files ``r, r + W, r + 2W, ...`` of the split (W ranks)
and reads only those. Per epoch, each actor orders its own samples by a permutation seeded with
(seed, epoch, r). Shards are not all the same size, so the actors would hold unequal counts; to keep
every rank stepping together, each rank's quota is ``N // W`` (+1 for the first ``N % W`` ranks), and
the samples above quota at the tail of a rank's order are handed, in rank order, to the ranks below
it. Every sample appears exactly once in exactly one rank's epoch list.

All ranks run ``steps = ceil(ceil(N / W) / B)`` steps per epoch. A rank's last batch holds what is
left (fewer than B when B does not divide its quota); a rank with nothing left for the final step
gets one padding sample with weight 0 (it flows through the model, and counts in no loss or metric),
so that all ranks enter the same collectives. No sample is dropped or repeated.

The cursor of a rank is (epoch, samples delivered in the epoch, seed, world size, batch size,
shard list fingerprint): the epoch's list is a pure function of those, so a restored actor skips
exactly the delivered samples and continues with the rest.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Cursor:
    epoch: int
    delivered: int
    """Batch slots (batches x batch size) of this epoch handed to the trainer by this rank, not just
    prefetched; the actor skips that many samples of the epoch's list on restore."""
    seed: int
    world_size: int
    batch_size: int
    shards: str
    """Fingerprint of the split's shard list and sizes: a cursor only fits the data it came from."""
    rng: dict
    """State of the epoch's permutation generator before it shuffled (a record; derived from seed)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Cursor":
        return Cursor(**d)


def owned_shards(n_shards: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, n_shards, world_size))


def shards_fingerprint(names: list[str], sizes: list[int]) -> str:
    return hashlib.sha256(repr(list(zip(names, sizes))).encode()).hexdigest()[:16]


def epoch_generator(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def quotas(total: int, world_size: int) -> list[int]:
    return [total // world_size + (r < total % world_size) for r in range(world_size)]


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    return -(-quotas(total, world_size)[0] // batch_size)


def epoch_lists(shard_sizes: list[int], world_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """For each rank, its epoch's samples in order, as (owner rank, index into the owner's samples).

    A rank's own samples are indexed in the order of its shards and of the samples within them."""
    owned = [sum(shard_sizes[s] for s in owned_shards(len(shard_sizes), r, world_size))
             for r in range(world_size)]
    quota = quotas(sum(owned), world_size)
    orders = [epoch_generator(seed, epoch, r).permutation(n) for r, n in enumerate(owned)]
    lists = [[(r, int(i)) for i in orders[r][:quota[r]]] for r in range(world_size)]
    pool = [(r, int(i)) for r in range(world_size) for i in orders[r][quota[r]:]]
    for r in range(world_size):
        need = quota[r] - len(lists[r])
        lists[r] += pool[:need]
        pool = pool[need:]
    assert not pool
    return lists


def batches(order: list[tuple[int, int]], steps: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The rank's list cut into ``steps`` batches; an empty one stands for the weight-0 padding batch."""
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(steps)]
