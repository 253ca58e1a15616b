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

Elastic resume (another number of ranks). A sample's identity that does not depend on W is its
position (shard, index in the shard). When a run saved by W ranks resumes with W' ranks mid-epoch,
``regroup`` turns the W cursors into W' cursors that carry a *stage* {"world_size": W, "delivered":
[d_0, ..., d_{W-1}]}: the samples of the epoch still to train are the tails of the W ranks' lists
after d_r. ``epoch_positions`` re-plans exactly those over the W' ranks (``spread``: each rank first
takes the remaining samples of the shards it owns, r' = shard mod W', up to its quota, the rest is
handed to the ranks below quota, as above), and the W' ranks count their cursors from 0 in that new
list. Stages chain (W -> W' -> W'' within one epoch); the next epoch is planned for W' as usual.

Length bucketing (``Bucketing``, data.bucket_window > 0). A batch is padded to its longest prompt, so a
random batch of short and long prompts trains mostly padding. With bucketing, each rank's list (planned
as above, for every group of a stage chain) is reordered window by window: the samples of ``window``
consecutive whole batches are sorted by prompt length (ties by list position), cut into batches, and
those batches put in a random order, seeded by (seed, epoch, stage) and the same on every rank
(``order="step"``): the ranks' windows cover the same steps and are each sorted, so at every step every
rank takes the batch of the same length rank in its window, and a step's batches have similar lengths
(the ranks of a step wait for the longest one). ``order="rank"``, the order of checkpoints written before
it, seeds each rank's shuffle with its rank too (independent orders). A trailing part batch stays last. The reordered list is still a pure function of the cursor's fields (plus the samples' lengths,
which every actor computes the same way), so the cursor stays exact: a rank has delivered exactly the
first ``delivered`` entries of its reordered list, and the elastic re-planning takes the tails of the
reordered lists.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

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
    stages: list = field(default_factory=list)
    """Earlier worker groups of this epoch, oldest first: [{"world_size", "delivered": per rank}] (empty
    unless the run was resumed with another number of ranks mid-epoch; see ``regroup``)."""
    bucket_window: int = 0
    """Batches per length-bucketing window (0: no bucketing): the lists' order depends on it."""
    bucket_order: str = "rank"
    """How the bucketed batches are shuffled (``Bucketing.order``): "step" (the same order on every rank,
    what a new epoch uses) or "rank" (one order per rank: a cursor written before "step" existed)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Cursor":
        return Cursor(**d)


ORDERS = ("step", "rank")


@dataclass(frozen=True)
class Bucketing:
    """How the epoch lists are reordered by prompt length (see the module docstring)."""

    lengths: list
    """Per shard of the split (in its order): each sample's prompt length in tokens, as the actors build it."""
    batch_size: int
    window: int
    """Whole batches per window (>= 1)."""
    order: str = "step"
    """"step": every rank's batches shuffled by one order, so a step's batches have similar lengths;
    "rank": each rank's by its own (the order before "step"; kept so that its cursors resume exactly)."""

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"unknown bucket order {self.order!r}; expected one of {ORDERS}")

    def generator(self, seed: int, epoch: int, rank: int, stage: int) -> np.random.Generator:
        """The generator that orders rank ``rank``'s batches in ``epoch`` (``stage``: the number of earlier
        groups of the epoch)."""
        if self.order == "step":
            return np.random.default_rng([seed, epoch, stage, 0x5354])   # "ST": not an epoch_generator seed
        return np.random.default_rng([seed, epoch, rank, 1, stage])

    def key(self, position: tuple[int, int]) -> int:
        return int(self.lengths[position[0]][position[1]])


def bucket(order: list, keys, batch_size: int, window: int, rng: np.random.Generator) -> list:
    """``order`` reordered by ``keys`` (one per entry) window by window: within each span of ``window``
    whole batches, the entries sorted by key (stable), cut into batches of ``batch_size``, and the batches
    shuffled by ``rng``; the entries after the last whole batch stay at the end, in their order."""
    keys = np.asarray(keys)
    whole = len(order) - len(order) % batch_size
    span = window * batch_size
    out: list = []
    for start in range(0, whole, span):
        idx = start + np.argsort(keys[start:min(start + span, whole)], kind="stable")
        chunks = idx.reshape(-1, batch_size)
        for c in rng.permutation(len(chunks)):
            out += [order[i] for i in chunks[c]]
    return out + list(order[whole:])


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


def epoch_lists(shard_sizes: list[int], world_size: int, seed: int, epoch: int,
                bucketing: Bucketing | None = None) -> list[list[tuple[int, int]]]:
    """For each rank, its epoch's samples in order, as (owner rank, index into the owner's samples),
    reordered by length when ``bucketing`` is given.

    A rank's own samples are indexed in the order of its shards and of the samples within them."""
    owned = [sum(shard_sizes[s] for s in owned_shards(len(shard_sizes), r, world_size))
             for r in range(world_size)]
    quota = quotas(sum(owned), world_size)
    orders = [epoch_generator(seed, epoch, r).permutation(n) for r, n in enumerate(owned)]
    lists = [[(r, int(i)) for i in orders[r][:quota[r]]] for r in range(world_size)]
    pool = [(r, int(i)) for r in range(world_size) for i in orders[r][quota[r]:]]
    lists = top_up(lists, pool, quota)
    if bucketing is None:
        return lists
    owner_keys = [np.concatenate([np.asarray(bucketing.lengths[s], dtype=np.int64)
                                  for s in owned_shards(len(shard_sizes), r, world_size)] or [np.zeros(0, np.int64)])
                  for r in range(world_size)]
    return [bucket(lst, [owner_keys[o][i] for o, i in lst], bucketing.batch_size, bucketing.window,
                   bucketing.generator(seed, epoch, r, 0)) for r, lst in enumerate(lists)]


def top_up(lists: list[list], pool: list, quota: list[int]) -> list[list]:
    """Each rank's list filled up to its quota from ``pool`` (the samples beyond the others' quotas), in rank
    order; the pool must be used up exactly."""
    for r, want in enumerate(quota):
        need = want - len(lists[r])
        lists[r] += pool[:need]
        pool = pool[need:]
    assert not pool
    return lists


def batches(order: list[tuple[int, int]], steps: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The rank's list cut into ``steps`` batches; an empty one stands for the weight-0 padding batch."""
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(steps)]


# ---------------------------------------------------------------------- elastic resume
Position = tuple[int, int]
"""(shard, index in the shard): a sample's identity whatever the number of ranks."""


def owned_positions(shard_sizes: list[int], rank: int, world_size: int) -> list[Position]:
    """Rank ``rank``'s own samples as positions, in the order of its owner indexes."""
    return [(s, j) for s in owned_shards(len(shard_sizes), rank, world_size) for j in range(shard_sizes[s])]


def spread(left: list[Position], n_shards: int, world_size: int) -> list[list[Position]]:
    """Plan ``left`` (in this order) over ``world_size`` ranks: balanced quotas, each rank first taking
    the samples of the shards it owns (no peer fetch), the surplus handed in rank order to those short."""
    quota = quotas(len(left), world_size)
    own: list[list[Position]] = [[] for _ in range(world_size)]
    for p in left:
        own[p[0] % world_size].append(p)
    lists = [own[r][:quota[r]] for r in range(world_size)]
    pool = [p for r in range(world_size) for p in own[r][quota[r]:]]
    return top_up(lists, pool, quota)


def epoch_positions(shard_sizes: list[int], world_size: int, seed: int, epoch: int,
                    stages: list[dict] = (), bucketing: Bucketing | None = None) -> list[list[Position]]:
    """For each of ``world_size`` ranks, its list of ``epoch`` as positions: ``epoch_lists`` when no
    earlier group trained part of the epoch, else the samples ``stages`` left untrained, re-planned (and
    reordered by length, as every group's lists are, when ``bucketing`` is given)."""
    if not stages:
        owned = [owned_positions(shard_sizes, r, world_size) for r in range(world_size)]
        return [[owned[o][i] for o, i in lst] for lst in epoch_lists(shard_sizes, world_size, seed, epoch, bucketing)]
    last = stages[-1]
    before = epoch_positions(shard_sizes, last["world_size"], seed, epoch, stages[:-1], bucketing)
    left = [p for lst, done in zip(before, last["delivered"]) for p in lst[done:]]
    lists = spread(left, len(shard_sizes), world_size)
    if bucketing is None:
        return lists
    return [bucket(lst, [bucketing.key(p) for p in lst], bucketing.batch_size, bucketing.window,
                   bucketing.generator(seed, epoch, r, len(stages))) for r, lst in enumerate(lists)]


def replanned_lists(shard_sizes: list[int], world_size: int, seed: int, epoch: int,
                    stages: list[dict], bucketing: Bucketing | None = None) -> list[list[tuple[int, int]]]:
    """``epoch_positions`` as (owner rank, index into the owner's samples), what the actors serve."""
    if not stages:
        return epoch_lists(shard_sizes, world_size, seed, epoch, bucketing)
    index = {p: (r, i) for r in range(world_size) for i, p in enumerate(owned_positions(shard_sizes, r, world_size))}
    return [[index[p] for p in lst] for lst in epoch_positions(shard_sizes, world_size, seed, epoch, stages,
                                                               bucketing)]


def left_in_epoch(shard_sizes: list[int], seed: int, epoch: int, stages: list[dict]) -> int:
    """Samples of ``epoch`` that the groups in ``stages`` did not train (the whole split when none)."""
    if not stages:
        return sum(shard_sizes)
    before = epoch_positions(shard_sizes, stages[-1]["world_size"], seed, epoch, stages[:-1])
    return sum(max(0, len(lst) - done) for lst, done in zip(before, stages[-1]["delivered"]))


def regroup(cursors: list[dict | None], world_size: int) -> list[dict | None]:
    """The cursors of ``world_size`` ranks that continue where the saved group's ``cursors`` (one per
    saved rank) stopped. The same world size: unchanged. At an epoch's end (all None): None for each
    rank. Mid-epoch: each new rank starts at 0 of the re-planned remainder (a new stage)."""
    if len(cursors) == world_size:
        return list(cursors)
    if all(c is None for c in cursors):
        return [None] * world_size
    if any(c is None for c in cursors):
        raise ValueError("the saved cursors mix ranks at an epoch's end and ranks mid-epoch; the checkpoint "
                         "is not a consistent cut of the data")
    first = cursors[0]
    keys = ("epoch", "seed", "batch_size", "shards", "world_size", "bucket_window", "bucket_order")
    odd = [c for c in cursors if any(c.get(k) != first.get(k) for k in keys)]
    if odd or first["world_size"] != len(cursors):
        raise ValueError(f"the saved cursors disagree on {keys} (or with their count {len(cursors)}): "
                         f"{first} vs {odd[:1]}; the checkpoint was not written by one worker group")
    stage = {"world_size": len(cursors), "delivered": [c["delivered"] for c in cursors]}
    stages = [*first.get("stages", []), stage]
    return [dict(first, delivered=0, world_size=world_size, stages=stages,
                 rng={"seed": [first["seed"], first["epoch"], r]}) for r in range(world_size)]
