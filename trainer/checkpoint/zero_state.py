"""The trainable state inside a worker group (ZeRO stage 3, or 2 over a replicated base): ``capture`` gathers
the flat fp32 partitions of the generator and P (master weights and AdamW's moments) to rank 0 with the RNG
states and data cursors; ``load_into`` puts a verified checkpoint back into every rank's engine.

Where a parameter's elements lie (``segments``): ZeRO-3 cuts every parameter into W equal slices, rank r's
slice at the same offset of its flat partition; stage 2 flattens a whole parameter group and cuts the flat
buffer into W equal partitions, so a parameter lies in one rank's partition or across two or more."""

from __future__ import annotations

import json
from typing import Callable

from .storage import CheckpointError, parse

OPT_KEYS = ("exp_avg", "exp_avg_sq")


STATE = "state::"
"""Prefix, in trainable.safetensors, of the method's non-trained state (``Method.state``)."""


def _trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full_shape(p) -> tuple:
    """A trainable parameter's whole shape (a ZeRO-3 parameter's own tensor is an empty placeholder)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def flat_groups(zero) -> list:
    """The flat fp32 partitions AdamW steps, one per parameter group, on this rank (DeepSpeed keeps the optimiser
    state per partition, not per parameter): ZeRO-3's and stage 2's names for them."""
    groups = getattr(zero, "fp32_partitioned_groups_flat", None)
    return groups if groups is not None else zero.single_partition_of_fp32_groups


def segments(zero, p, world: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(parameter group, [(rank, offset in that rank's flat partition, elements), ...]): where the flattened
    parameter ``p``'s elements lie, in order."""
    if hasattr(p, "ds_id"):          # ZeRO-3: the same-sized slice of p on every rank, the last one padded
        group, offset, n = zero.grad_position[zero.get_param_id(p)]
        out, left = [], p.ds_numel
        for r in range(world):
            if left > 0:
                out.append((r, offset, min(n, left)))
            left -= n
        return group, out
    group = next(i for i, params in enumerate(zero.bit16_groups) if any(q is p for q in params))
    start = (p.data_ptr() - zero.bit16_groups_flat[group].data_ptr()) // p.element_size()   # p is a view of it
    size, out, end = zero.partition_size[group], [], start + p.numel()
    while start < end:
        r, offset = divmod(start, size)
        take = min(end - start, size - offset)
        out.append((r, offset, take))
        start += take
    return group, out


def _adam_steps(engine) -> list[float]:
    """AdamW's step count of each flat fp32 partition."""
    zero = engine.optimizer
    return [float(zero.optimizer.state[g].get("step", 0)) for g in flat_groups(zero)]


def _gather_partitions(zero, key: str | None, rank: int, world: int, spare: list | None = None) -> list | None:
    """Every rank's fp32 partition of each flat parameter group (key None: the master weights, else
    that AdamW state), copied to rank 0 only: rank 0's own copied, the others' sent point to point
    (``send``/``irecv``: gloo's ``gather`` moves the same bytes 6-10x slower on one host, measured in
    benchmarks/checkpoint.py); None on other ranks. ``spare``: the buffers of an earlier capture whose
    checkpoint is written, filled again where their shapes fit (fresh ones cost rank 0 a page fault per
    4 KiB: 0.11 s against 0.015 s for 186 MB here, with the loop waiting)."""
    import torch
    import torch.distributed as dist
    out = []
    for i, flat in enumerate(flat_groups(zero)):
        local = (flat if key is None else zero.optimizer.state[flat][key]).detach().contiguous()
        if rank != 0:
            dist.send(local, dst=0)
            continue
        parts = spare[i] if spare is not None and i < len(spare) and len(spare[i]) == world and all(
            (t.shape, t.dtype, t.device) == (local.shape, local.dtype, local.device) for t in spare[i]) else None
        parts = parts or [torch.empty_like(local) for _ in range(world)]
        parts[0].copy_(local)                                                 # training goes on in place
        for request in [dist.irecv(parts[r], src=r) for r in range(1, world)]:
            request.wait()
        out.append(parts)
    return out if rank == 0 else None


def _assemble(gathered: list, group: int, where: list[tuple[int, int, int]], shape: tuple):
    """A full parameter from the ranks' partitions (``segments``), as ``Pieces`` (written without a copy)."""
    from .uploader import Pieces
    return Pieces(tuple(shape), [gathered[group][r][offset:offset + n] for r, offset, n in where])


def capture(engine, model, loop_state: dict, cursor: dict | None,
            spare: dict | None = None) -> Callable[[], tuple[dict, dict, dict, dict]] | None:
    """On rank 0, a function that returns (trainable, optimizer, rng, state) of this moment, None on the
    others (a collective: every rank must call it at the same step). The flat partitions are copied to
    rank 0 here, 3 transfers per parameter group, not 3 all-gathers per parameter; the full tensors are
    assembled from those copies when the function runs (on the stager thread, off the training loop).
    The copies are the function's ``buffers``; hand them back as ``spare`` once that checkpoint is written
    and the next capture fills them again instead of allocating its own."""
    import torch
    import torch.distributed as dist
    zero, rank, world = engine.optimizer, dist.get_rank(), dist.get_world_size()
    spare = spare or {}
    gathered = {k: _gather_partitions(zero, k, rank, world, spare.get(k)) for k in (None, *OPT_KEYS)}
    mine = {"rng": torch.get_rng_state().tolist(), "cursor": cursor,
            "cuda_rng": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)     # in memory between our own ranks; never read from storage
    if rank != 0:
        return None
    layout = [(n, *segments(zero, p, world), full_shape(p)) for n, p in _trainable(model)]
    extra = {STATE + n: t.detach().cpu().clone().contiguous()       # e.g. Laser's item table: the same on every rank
             for n, t in model.method.state(model).items()}
    rng = {f"rank{r}": torch.tensor(m["rng"], dtype=torch.uint8) for r, m in enumerate(ranks)}
    rng.update({f"rank{r}.cuda": torch.tensor(m["cuda_rng"], dtype=torch.uint8)
                for r, m in enumerate(ranks) if m["cuda_rng"] is not None})
    state = {"loop": json.loads(json.dumps(loop_state, default=float)),      # a snapshot: training goes on
             "cursors": [m["cursor"] for m in ranks], "world_size": world,
             "adam_steps": _adam_steps(engine), "scheduler": engine.lr_scheduler.state_dict(),
             "global_steps": engine.global_steps, "global_samples": engine.global_samples,
             "micro_steps": engine.micro_steps}

    def assemble() -> tuple[dict, dict, dict, dict]:
        trainable = {n: _assemble(gathered[None], *where) for n, *where in layout}
        opt = {f"{n}::{k}": _assemble(gathered[k], *where) for n, *where in layout for k in OPT_KEYS}
        return {**trainable, **extra}, opt, rng, state
    assemble.buffers = gathered
    return assemble


def restore_schedule(sched, optimizer, saved: dict, rank: int) -> None:
    """Continue the LR schedule at the saved step, under *this* run's schedule (its lr_peak, lr_end, warm-up
    and length): the step count comes from the checkpoint, the rates from the config. LambdaLR's state
    also holds the old peak (``base_lrs``), which must not come back: with a changed optim.lr_peak it
    would scale the new schedule by the old peak."""
    saved = dict(saved)
    old = saved.pop("base_lrs", None)
    saved.pop("_last_lr", None)
    sched.load_state_dict(saved)
    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    if rank == 0 and old is not None and [float(x) for x in old] != [float(x) for x in sched.base_lrs]:
        from .storage import _log
        _log(f"optim.lr_peak changed from {old[0]:g} to {sched.base_lrs[0]:g}: the new schedule applies from "
             f"optimiser step {sched.last_epoch} (lr now {lrs[0]:.3g})")


def load_into(engine, model, files: dict[str, bytes], rank: int) -> dict:
    """Put a verified checkpoint's state into the engine (every rank); returns its state.json. Each rank writes
    its own partitions' elements (``segments``) of the master weights and AdamW's moments, whatever world
    size saved them, and the model's weights: ZeRO-3's partitions through a gather, stage 2's whole copy."""
    import deepspeed
    import torch
    trainable, opt, rng, state = parse(files)
    extra = {n[len(STATE):]: trainable.pop(n) for n in list(trainable) if n.startswith(STATE)}
    params = _trainable(model)
    want = {n: full_shape(p) for n, p in params}
    have = {n: tuple(t.shape) for n, t in trainable.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:4]
        raise CheckpointError(f"the checkpoint holds other trainable tensors than this model (e.g. {diff}): "
                              f"it was saved with a different generator, injection or LLM config")
    zero, world = engine.optimizer, engine.world_size
    groups = flat_groups(zero)
    fused = zero.optimizer.defaults.get("fused")   # its step counter on the parameters' device; the loop's on the host
    for g in groups:                               # AdamW creates its state at the first step: create it now
        if not zero.optimizer.state[g]:
            zero.optimizer.state[g] = {"step": torch.tensor(0.0, device=g.device if fused else "cpu"),
                                       "exp_avg": torch.zeros_like(g), "exp_avg_sq": torch.zeros_like(g)}
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:     # stage 2 links each parameter to its slice of that state after its first step: now
        link()               # (DeepSpeed's safe_get_full_optimizer_state reads it through the link)
    with torch.no_grad():
        for n, p in params:
            group, where = segments(zero, p, world)
            for key, value in ((None, trainable[n]), *((k, opt[f"{n}::{k}"]) for k in OPT_KEYS)):
                local = groups[group] if key is None else zero.optimizer.state[groups[group]][key]
                flat, done = value.reshape(-1), 0
                for r, offset, k in where:
                    if r == rank:
                        local[offset:offset + k].copy_(flat[done:done + k])
                    done += k
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):   # a no-op on a stage-2 parameter
                if rank == 0 or not hasattr(p, "ds_id"):
                    p.data.copy_(trainable[n])
    for g, s in zip(groups, state["adam_steps"]):
        st = zero.optimizer.state[g]["step"]
        zero.optimizer.state[g]["step"] = (torch.tensor(s, dtype=st.dtype, device=st.device) if torch.is_tensor(st)
                                           else s)
    if set(extra) != set(model.method.state(model)):
        raise CheckpointError(f"the checkpoint holds the method state {sorted(extra)}, this model needs "
                              f"{sorted(model.method.state(model))}: it was saved by another method")
    with torch.no_grad():
        model.method.load_state(model, extra)
    restore_schedule(engine.lr_scheduler, zero.optimizer, state["scheduler"], rank)
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    # checkpoints fall on window ends: with another world size (an elastic resume) the accumulation may
    # differ, and DeepSpeed finds its window boundaries from micro_steps
    same = state["world_size"] == engine.world_size
    engine.micro_steps = state["micro_steps"] if same else state["global_steps"] * engine.gradient_accumulation_steps()
    restore_rng(rng, rank, state)
    return state


def restore_rng(rng: dict, rank: int, state: dict) -> None:
    """This rank's saved torch RNG state; a rank the saving group did not have (an elastic resume with more
    workers) gets a fresh generator seeded from (optimiser step, rank), so that its dropout masks differ
    from the other ranks' and repeat on a second resume from the same checkpoint."""
    import torch
    if f"rank{rank}" not in rng:
        torch.manual_seed(int(state["global_steps"]) * 1_000_003 + rank)
        return
    torch.set_rng_state(rng[f"rank{rank}"])
    if f"rank{rank}.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"])
