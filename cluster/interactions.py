"""InteractionShard actors: each owns a slice of a split's WebDataset shards and feeds one trainer rank.

Per epoch (see ``plan.py`` for the exact-once assignment) an actor orders its samples, builds the
prompts (tokenizer loaded once per actor; each sample with the template of its domain: the sample's
"domain" in a multi-domain directory, else dataset.json's), looks up the CF embeddings from the EmbeddingServers,
and keeps up to ``prefetch`` ready batches in a queue ahead of the trainer.

A batch is a dict of numpy arrays: ``input_ids`` (B, T) right-padded, ``lengths`` (B,),
``user_emb`` / ``item_emb`` (B, d), ``labels`` (B,), ``weights`` (B,; 0 for a padding sample),
``sample_ids``, ``users`` (B,), ``cold`` (B,), ``queries`` (B,; the rank split's query id, -1
elsewhere), ``items`` (B,), ``slots`` (B, S; only with a template that has embedding slots: CoLLM's),
``history_emb`` (B, H, d) and ``history_pad`` (B, H) (only with ``history_items``: Laser's), and ``lookup_s``: the seconds the embedding lookups
for this batch took (logged by the trainer as ``time/embedding_lookup_s``).

Restarts: the actors are started with ``max_restarts`` (default -1: always come back, as the
EmbeddingServers do). Ray re-runs ``__init__`` with the original arguments, so a restarted actor
reloads its shards and knows nothing of the epoch: the trainer's ``BatchIterator`` sees its calls
fail, calls ``start_epoch`` again at its cursor and re-requests (``client.py``). Each actor is named
``cora-data-<split>-<group>-r<rank>`` in the "cora" namespace (``<group>`` a fresh id per
``start_interaction_shards`` call) and finds its peers by name when it first needs them, so the
wiring survives a restart. The idempotent calls (``describe``, ``start_epoch``, ``get_samples``) are
sent again by Ray when the actor died under them or is restarting (``max_task_retries=-1``: until the
actor is back, or dead for good); ``next_batch`` is not (its queue died with the actor).
Ray logs at creation that the constructor arguments are in the object store (the EmbeddingClient's
handles put them there): a restart reads them from the driver's node, and fails only if that copy is
lost (ray-project/ray#53727), e.g. with the driver's node, which ends the run anyway.

Dashboard metrics: ``cora_prefetch_depth`` (gauge, ready batches queued), ``cora_samples_per_second``
(gauge) and ``cora_samples_produced`` (counter), tagged with split and rank.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from ray.util.metrics import Counter, Gauge

from cora.data.schema import manifest_domains, read_manifest
from cora.fileio import entry_digest, entry_problem, hasher, is_remote, join, open_fs, storage_env
from cora.prompts import pad_prompts

from . import plan

_END = "end-of-epoch"
NAMESPACE = "cora"


class DataError(ValueError):
    """A split, shard or rank assignment that cannot feed the trainer."""


def split_shards(manifest: dict, data_dir: str, split: str) -> tuple[list[str], list[int]]:
    """(paths, sizes) of a split's shards, from dataset.json."""
    names = manifest["shards"].get(split)
    if names is None:
        raise DataError(f"split {split!r} not in {data_dir}/dataset.json; splits: {', '.join(manifest['shards'])}")
    rows, per = manifest["counts"]["splits"][split]["rows"], manifest["samples_per_shard"]
    sizes = [per] * (len(names) - 1) + [rows - per * (len(names) - 1)]
    return [join(str(data_dir), n) for n in names], sizes


class _Hashing:
    """A read-only stream that counts and hashes what is read through it (a shard checked as it streams)."""

    def __init__(self, raw, digest: str):
        self.raw, self.hash, self.size = raw, hasher(digest), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


def read_shard(uri: str, entry: dict | str | None) -> list[dict]:
    """The samples of one WebDataset shard at a path or URI (``pyarrow.fs``), streamed: the tar is parsed
    as its bytes arrive, never held whole, and its size and digest are checked against ``entry`` (its
    dataset.json entry; None: unchecked, a directory written before checksums) once read to the end.

    The tar is read with the standard library's streaming ``tarfile`` mode, not webdataset's reader:
    importing webdataset imports torch (1 s of CPU per actor, paid by every InteractionShard of every run);
    a WebDataset shard is a plain tar, one "<key>.json" member per sample (cora.data.write.write_shards)."""
    import tarfile
    fs, path = open_fs(uri)
    try:
        with fs.open_input_stream(path) as raw:
            src = _Hashing(raw, (entry_digest(entry)[0] if entry is not None else None) or "sha256")
            with tarfile.open(fileobj=src, mode="r|") as tar:
                samples = [json.loads(tar.extractfile(m).read()) for m in tar
                           if m.isfile() and m.name.endswith(".json")]
            while src.read(1 << 20):          # the tar's end blocks count in the checksum too
                pass
    except FileNotFoundError:
        raise DataError(f"shard file {uri} is missing; prepare the data again") from None
    except tarfile.TarError as e:
        raise DataError(f"shard file {uri} is not a readable tar ({e}); prepare the data again") from None
    problem = entry_problem(entry, src.size, lambda name: src.hash.hexdigest()) if entry is not None else None
    if problem:
        raise DataError(f"shard file {uri} {problem} (dataset.json); prepare the data again")
    if src.size % 512:      # a tar cut at a member's header just ends; a whole one is whole 512-byte blocks
        raise DataError(f"shard file {uri} is cut short ({src.size} bytes, not whole 512-byte tar blocks); "
                        "prepare the data again")
    return samples


def check_assignment(names: list[str], split: str, world_size: int) -> None:
    if len(names) < world_size:
        raise DataError(f"split {split!r} has {len(names)} shard file(s) for {world_size} ranks, so rank "
                        f"{len(names)} would own none; prepare the data again with a smaller "
                        f"--samples-per-shard (at most rows / ranks), or use fewer ranks")


@ray.remote(concurrency_groups={"feed": 1, "peers": 2})
class InteractionShard:
    """Feeds one rank. ``start_epoch``/``next_batch`` run one at a time in call order (the "feed"
    group), so batches come out in the planned order however many requests are in flight; peers'
    ``get_samples`` calls run beside them (the "peers" group) while the producer thread works."""

    def __init__(self, data_dir: str, split: str, rank: int, world_size: int, *, batch_size: int, seed: int,
                 embeddings, tokenizer: str = "smollm2", domain: str | None = None, max_history: int = 10,
                 max_length: int = 512, prefetch: int = 4, sasrec_history: int = 0,
                 peers: list[str] | None = None, template: str = "", history_items: int = 0,
                 bucket_window: int = 0, pad_multiple: int = 1):
        """``peers``: the actor names of all ranks of the group (rank order), resolved when first needed;
        ``template``: the method's template family prefix (``Method.template``: "collm-" for CoLLM's prompt
        with embedding slots), put before the domain; ``history_items``: when > 0, each batch also carries the
        CF embeddings of each sample's last ``history_items`` history items (Laser's M-Former input);
        ``bucket_window``: when > 0, each epoch's list is reordered by prompt length in windows of that many
        batches (``plan.Bucketing``; the lengths of this rank's samples are computed here, the peers' asked
        for); ``pad_multiple``: each batch's token dimension is rounded up to a multiple of it."""
        from cora.prompts import domain_encoders
        from cora.tokenizer import load_tokenizer
        manifest = read_manifest(data_dir)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.seed, self.prefetch = batch_size, seed, prefetch
        self.paths, self.sizes = split_shards(manifest, data_dir, split)
        check_assignment(self.paths, split, world_size)
        mine = plan.owned_shards(len(self.paths), rank, world_size)
        # only this rank's shards, streamed from a path or object storage and checked against dataset.json
        entries = manifest.get("files", {})
        names = manifest["shards"][split]
        self.samples = [sample for s in mine for sample in read_shard(self.paths[s], entries.get(names[s]))]
        want = sum(self.sizes[s] for s in mine)
        if len(self.samples) != want:
            raise DataError(f"rank {rank}: read {len(self.samples)} samples from {len(mine)} shards of split "
                            f"{split!r}, dataset.json says {want}; the shards are damaged, prepare again")
        self.total = sum(self.sizes)
        self.steps = plan.steps_per_epoch(self.total, world_size, batch_size)
        tok = load_tokenizer(tokenizer)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # one encoder per domain: a multi-domain directory's samples each name theirs ("domain"); a
        # ``domain`` given here is used for every sample instead
        self.domain = domain
        self.encoders = domain_encoders(tok, template, [domain] if domain else manifest_domains(manifest),
                                        max_history, max_length)
        self.slots = next(iter(self.encoders.values())).template.slots
        self.bucket_window, self.pad_multiple = bucket_window, pad_multiple
        self.lengths: dict[int, np.ndarray] = {}      # per shard: prompt lengths (bucketing), peers' on demand
        if bucket_window > 0:
            own = np.array([len(self._encode(sample)[0]) for sample in self.samples], dtype=np.int32)
            bounds = np.cumsum([self.sizes[s] for s in mine])[:-1]
            self.lengths = dict(zip(mine, np.split(own, bounds)))
        self.embeddings, self.sasrec_history, self.history_items = embeddings, sasrec_history, history_items
        self.peer_names, self.peers = peers, {}
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        # ended until start_epoch: a next_batch left over from before a restart gets None, takes no batch
        self.thread, self.stop, self.ended, self.run = None, threading.Event(), True, None
        # the producer thread and the calls share the GIL: hand it over within 1 ms, not the default 5,
        # so that a ready batch is returned at once while the producer builds the next one
        sys.setswitchinterval(0.001)
        tags = {"split": split, "rank": str(rank)}
        self._depth = Gauge("cora_prefetch_depth", "ready batches queued for the trainer", ("split", "rank"))
        self._rate = Gauge("cora_samples_per_second", "samples prepared per second", ("split", "rank"))
        self._produced = Counter("cora_samples_produced", "samples prepared", ("split", "rank"))
        for m in (self._depth, self._rate, self._produced):
            m.set_default_tags(tags)

    # ------------------------------------------------------------------ set-up
    def _peer(self, owner: int):
        """The actor of rank ``owner``, found by name (also after this actor or the peer restarted)."""
        if owner not in self.peers:
            if self.peer_names is None:
                raise DataError(f"rank {self.rank} needs samples of rank {owner} but was started without its "
                                f"peers' names; start the actors with start_interaction_shards")
            self.peers[owner] = ray.get_actor(self.peer_names[owner], namespace=NAMESPACE)
        return self.peers[owner]

    @ray.method(max_task_retries=-1)
    def describe(self) -> dict:
        quota = plan.quotas(self.total, self.world_size)[self.rank]
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size, "total": self.total,
                "quota": quota, "steps": self.steps, "batch_size": self.batch_size, "seed": self.seed,
                "owned_samples": len(self.samples), "bucket_window": self.bucket_window,
                "shards": plan.shards_fingerprint([Path(p).name for p in self.paths], self.sizes)}

    @ray.method(concurrency_group="peers", max_task_retries=-1)
    def get_lengths(self, shards: list[int]) -> dict[int, np.ndarray]:
        """The prompt lengths of the samples of ``shards`` (this actor's own), for the peers' bucketing."""
        return {s: self.lengths[s] for s in shards}

    def _bucketing(self, order: str = "step") -> plan.Bucketing | None:
        """The split's prompt lengths (this rank's computed at start, the others' asked of their owners once);
        ``order``: how the batches are shuffled (``plan.Bucketing.order``)."""
        if self.bucket_window <= 0:
            return None
        missing: dict[int, list[int]] = {}
        for s in range(len(self.sizes)):
            if s not in self.lengths:
                missing.setdefault(s % self.world_size, []).append(s)
        for got in ray.get([self._peer(o).get_lengths.remote(ss) for o, ss in missing.items()]):
            self.lengths.update(got)
        return plan.Bucketing([self.lengths[s] for s in range(len(self.sizes))], self.batch_size, self.bucket_window, order)

    @ray.method(concurrency_group="peers", max_task_retries=-1)
    def get_samples(self, indices: list[int]) -> list[dict]:
        """Samples this actor owns, by index (for peers that take over part of its quota)."""
        return [self.samples[i] for i in indices]

    # ------------------------------------------------------------------ epochs
    @ray.method(concurrency_group="feed", max_task_retries=-1)
    def start_epoch(self, epoch: int, skip: int = 0, run: str | None = None, stages: list | None = None,
                    bucket_order: str = "step") -> int:
        """Begin producing ``epoch``'s batches, skipping the first ``skip`` samples (a restored cursor;
        a multiple of the batch size). Returns the number of batches that will follow. ``run``: a token
        that ``next_batch`` calls must carry (calls left over from an earlier start get None). ``stages``:
        the cursor's earlier worker groups of this epoch (an elastic resume): the epoch is then what they
        left untrained, re-planned over this group (``plan.regroup``). ``bucket_order``: the cursor's (a
        checkpoint written before "step" existed resumes in its own order). Idempotent, so Ray sends it again
        when the actor died under it (as ``describe``); ``next_batch`` is not."""
        if skip % self.batch_size:
            raise DataError(f"cursor offset {skip} is not a multiple of the batch size {self.batch_size}")
        self._halt()
        self.stop.clear()
        self.ended, self.run = False, run
        self.queue = queue.Queue(maxsize=self.prefetch)
        lists = plan.replanned_lists(self.sizes, self.world_size, self.seed, epoch, stages or [],
                                     self._bucketing(bucket_order))
        steps = plan.steps_per_epoch(sum(map(len, lists)), self.world_size, self.batch_size) if stages else self.steps
        order = lists[self.rank]
        batches = plan.batches(order, steps, self.batch_size)[skip // self.batch_size:]
        self.thread = threading.Thread(target=self._produce, args=(batches,), daemon=True)
        self.thread.start()
        return len(batches)

    @ray.method(concurrency_group="feed")
    def next_batch(self, timeout: float = 600.0, run: str | None = None):
        """The next ready batch, or None at (and after) the end of the epoch, before the first
        ``start_epoch`` and for a ``run`` other than the last start's; re-raises a producer error."""
        if self.ended or run != self.run:
            return None
        item = self.queue.get(timeout=timeout)
        self._depth.set(self.queue.qsize())
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str) and item == _END:
            self.ended = True
            return None
        return item

    def _halt(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.stop.set()
            while self.thread.is_alive():
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    time.sleep(0.01)

    def _produce(self, batches: list[list[tuple[int, int]]]) -> None:
        try:
            t0, done = time.perf_counter(), 0
            for refs in batches:
                if self.stop.is_set():
                    return
                batch = self._build(self._fetch(refs))
                done += int(batch["weights"].sum())
                if refs:
                    self._produced.inc(len(refs))
                self._rate.set(done / max(time.perf_counter() - t0, 1e-6))
                self._put(batch)
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - surfaced to the trainer by next_batch
            self._put(DataError(f"rank {self.rank} split {self.split!r}: {type(e).__name__}: {e}"))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                self._depth.set(self.queue.qsize())
                return
            except queue.Full:
                continue

    def _fetch(self, refs: list[tuple[int, int]]) -> list[dict]:
        if not refs:                                   # the weight-0 padding sample
            return [dict(self.samples[0], label=0, _padding=True)]
        out: list[dict | None] = [None] * len(refs)
        by_owner: dict[int, list[int]] = {}
        for k, (owner, i) in enumerate(refs):
            if owner == self.rank:
                out[k] = self.samples[i]
            else:
                by_owner.setdefault(owner, []).append(k)
        for owner, ks in by_owner.items():
            got = ray.get(self._peer(owner).get_samples.remote([refs[k][1] for k in ks]))
            for k, s in zip(ks, got):
                out[k] = s
        return out

    def _build(self, samples: list[dict]) -> dict:
        users = np.array([s["user"] for s in samples], dtype=np.int64)
        items = np.array([s["item"] for s in samples], dtype=np.int64)
        t0 = time.perf_counter()              # the lookups are timed alone (the producer runs far ahead)
        item_wait = self.embeddings.lookup_async("item", items)
        if self.sasrec_history:
            from cora.cf.models import pad_history
            user_emb = self.embeddings.user_vectors(pad_history([s["history"] for s in samples], self.sasrec_history))
        else:
            user_emb = self.embeddings.lookup("user", users)
        item_emb = item_wait()
        if self.history_items:
            from cora.laser import history_embeddings
            hist_emb, hist_pad = history_embeddings([s["history"] for s in samples],
                                                    lambda ids: self.embeddings.lookup("item", ids), self.history_items,
                                                    item_emb.shape[1])
            extra_cf = {"history_emb": hist_emb, "history_pad": hist_pad}
        else:
            extra_cf = {}
        lookup_s = time.perf_counter() - t0
        encoded = [self._encode(s) for s in samples]
        ids, lengths = pad_prompts([e[0] for e in encoded], self.pad_id, self.pad_multiple)
        extra = {"slots": np.array([e[1] for e in encoded], dtype=np.int64)} if self.slots else {}
        return {"input_ids": ids, "lengths": lengths, "user_emb": user_emb, "item_emb": item_emb, **extra, **extra_cf,
                "items": items,
                "lookup_s": np.float64(lookup_s),
                "labels": np.array([s["label"] for s in samples], dtype=np.float32),
                "weights": np.array([0.0 if s.get("_padding") else 1.0 for s in samples], dtype=np.float32),
                "sample_ids": np.array([s["sample_id"] for s in samples], dtype=np.int64), "users": users,
                "cold": np.array([s["cold_user"] or s["cold_item"] for s in samples]),
                "queries": np.array([s.get("query", -1) for s in samples], dtype=np.int64)}

    def _encode(self, sample: dict):
        """(token ids, slot positions) of ``sample``'s prompt."""
        return self._encoder(sample).encode_with_slots(sample["history_titles"], sample["title"])

    def _encoder(self, sample: dict):
        """The prompt encoder of ``sample``'s domain (the directory's one domain when it names none)."""
        if self.domain or "domain" not in sample:
            return next(iter(self.encoders.values()))
        enc = self.encoders.get(sample["domain"])
        if enc is None:
            raise DataError(f"sample {sample['sample_id']} has domain {sample['domain']!r}, which dataset.json's "
                            f"domains ({', '.join(self.encoders)}) do not list; prepare the data again")
        return enc

    def pid(self) -> int:
        import os
        return os.getpid()


def start_interaction_shards(data_dir: str, split: str, world_size: int, *, embeddings, batch_size: int,
                             seed: int, num_cpus: float = 1.0, max_restarts: int = -1, wait: bool = True,
                             **kwargs) -> list:
    """One actor per trainer rank, named (peers find each other by name), each checked to have loaded
    its shards (``wait=False``: not yet; call ``loaded`` on them, e.g. once for several groups started together,
    whose processes then start side by side). ``max_restarts``: how often Ray brings a dead actor back (-1:
    always). Keep the returned handles while the group is in use: a handle found by name does not keep an
    actor alive."""
    manifest = read_manifest(data_dir)
    names, _ = split_shards(manifest, data_dir, split)
    check_assignment(names, split, world_size)
    group = uuid.uuid4().hex[:8]                   # two groups (runs, splits) never share a name
    peers = [f"cora-data-{split}-{group}-r{r}" for r in range(world_size)]
    # from object storage: this process's endpoint and region (never credentials: each node has its own)
    env = {"runtime_env": {"env_vars": storage_env()}} if is_remote(data_dir) else {}
    actors = [InteractionShard.options(num_cpus=num_cpus, name=peers[r], namespace=NAMESPACE,
                                       max_restarts=max_restarts, **env).remote(
        data_dir, split, r, world_size, batch_size=batch_size, seed=seed, embeddings=embeddings, peers=peers,
        **kwargs) for r in range(world_size)]
    if wait:
        loaded(actors)
    return actors


def loaded(actors: list) -> None:
    """Wait until each of ``actors`` has loaded its shards (raises the first one's error, e.g. a DataError)."""
    ray.get([a.describe.remote() for a in actors])
