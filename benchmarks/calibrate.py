"""The planner's machine constants (cora.plan.Hardware), measured on this machine, one thread per rank.

    python benchmarks/calibrate.py --json

  flops              FLOP/s of one thread on float32 matrix products of a training step's shapes
                     (tokens 768 x hidden 1024 x 2816, and x 1024): the median of 2 m k n / time
  bandwidth          bytes/s a rank receives in a 2-rank gloo all-gather of 16 MiB (1 - 1/W of it moves)
  latency            seconds of a 2-rank gloo all-gather of 4 KiB (the per-collective cost)
  optim_s_per_param  the trainer's AdamW (cora.optim: torch's fused kernel) step seconds per parameter,
                     over 4M fp32 parameters

    python benchmarks/calibrate.py --fit REPORT --size smollm2-360m-shape --small tiny-llama \
        --flops 104.9e9 [--json]

fits the constants only a training step shows, from a ``cora scale`` report run with ``--workers 1,2
--partitioning zero3,replicated``: the four points of each of the two sizes (every other point of the report
is left to validate them). F and t_p are calibrate's own figures (given; the latency given is where the fit of
the latency starts); S is a point's measured step, the planner's terms are taken at its
measured prompt lengths (the mean for the time, the longest for the memory) and at the ZeRO stage it ran
(the report's zero_stage: a replicated base's generator and P under stage 2 hook no module):

  element_s, step_overhead_s   t_e and t_0 from the two 1-worker replicated points (small, large):
                     S - flops / F - AdamW = activation elements x t_e + t_0, two equations
  copy_bandwidth, module_overhead_s   from the two sizes' 1-worker zero3 points against their replicated
                     ones (the same batches: only ZeRO-3 differs): S_zero3 - S_replicated = frozen bytes /
                     copy bandwidth + 2 x (hooked modules, zero3 - replicated) x t_mod, two equations (the
                     frozen bytes set the large size's difference, the hooks the small one's)
  busy_slowdown, sync_overhead_s   from the two sizes' 2-worker replicated points: S = k_busy x (flops / F +
                     elements x t_e) + the trainable part's gathers, reduce and AdamW + t_0 + t_sync, two
                     equations (the two ranks share the 2 cores; the step's fixed collectives wait on each other)
  bandwidth, latency from the two sizes' 2-worker zero3 points: S - everything else planned = the bytes the
                     step's collectives move / BW + their calls x lat, two equations (the large size's bytes
                     set BW, the small size's ~60 calls the latency under the two ranks' contention). The two
                     pairs lean on each other's constants a little (the trainable part's collectives): solved
                     in turns until they settle
  runtime_bytes      R = the W = 1 replicated rank's resident set after set-up - its frozen and trainable bytes
  activation_factor  (peak - resident set after set-up) / planned activations, W = 1 replicated
  stage3_activation_factor   the same at W = 1, zero3 (ZeRO-3's module hooks)
  comm_bytes         C = the small size's W = 2 replicated ranks' peak - everything else planned
  gathered_factor    (the W = 2 zero3 ranks' peak - everything else planned) / the gathered weights' bytes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cora.optim import OptimConfig, build_optimizer  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def matmul_flops() -> float:
    rates = []
    for m, k, n in [(768, 1024, 2816), (768, 1024, 1024), (768, 2816, 1024)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / timed(lambda: a @ b, 15))
    return statistics.median(rates)


def adamw_s_per_param() -> float:
    p = torch.nn.Parameter(torch.randn(4 * 2**20))
    p.grad = torch.randn_like(p)
    opt, _ = build_optimizer([p], OptimConfig(), 1000)           # the trainer's AdamW (fused)
    return timed(opt.step, 10) / p.numel()


def gather_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for name, numel in (("big", 4 * 2**20), ("small", 1024)):
        x = torch.randn(numel)
        buf = torch.empty(2 * numel)
        out[name] = timed(lambda: dist.all_gather_into_tensor(buf, x), 10 if name == "big" else 50)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def gather_constants() -> tuple[float, float]:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=gather_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=300)
    for p in procs:
        p.join()
    latency = out["small"]
    bandwidth = (4 * 2**20 * 4) / max(out["big"] - latency, 1e-9)       # bytes received by one rank
    return bandwidth, latency


def solve2(first: tuple, second: tuple) -> tuple[float, float]:
    """(x, y) with a x + b y = c for both (a, b, c)."""
    (a1, b1, c1), (a2, b2, c2) = first, second
    det = a1 * b2 - a2 * b1
    return (c1 * b2 - c2 * b1) / det, (a1 * c2 - a2 * c1) / det


def fit(report: str, size: str, small: str, flops: float, latency: float) -> dict:
    """The step-level constants from a cora scale report (see the module docstring)."""
    import csv
    import dataclasses

    from cora.plan import CPU, DTYPE_BYTES, activation_elements, gathers, hooked_modules, memory, plan
    from trainer.planner import setup_for
    from trainer.train import _cf_info
    rows = {(r["size"], int(r["workers"]), r["partitioning"]): r
            for r in csv.DictReader(open(Path(report, "scaling.csv"))) if r["status"] == "measured"}
    need = [(k, w, p) for k in (small, size) for w in (1, 2) for p in ("zero3", "replicated")]
    if [k for k in need if k not in rows]:
        raise SystemExit(f"--fit: {report} lacks the measured points {[k for k in need if k not in rows]}: run cora "
                         f"scale with --sizes {small},{size} --workers 1,2 --partitioning zero3,replicated")
    cfg = json.loads(next(Path(report, "runs").glob(f"{size}-w1-*/config.json")).read_text())
    gen, cf_dim, e = cfg["generator"], _cf_info(cfg["data"]["cf_dir"])[0], cfg["engine"]

    def ranks(key):
        d = Path(report, "ranks", f"{key[0]}-w{key[1]}-{key[2]}")
        return [json.loads(p.read_text()) for p in sorted(d.glob("rank*.json"))]

    def setup(key, longest=False):
        r = rows[key]
        per_rank = int(r["global_batch"]) // key[1]
        seq = (max(s["padded_tokens"] for x in ranks(key) for s in x["log"]) // per_rank if longest
               else int(r["seq_len"]))
        return setup_for(key[0], key[1], int(r["micro_batch"]), seq, cfg["llm"]["dtype"], e["activation_checkpointing"],
                         key[2], gen, cf_dim, cfg["injection"]["rank"],
                         0 if e["persistence_threshold"] == "auto" else e["persistence_threshold"],
                         zero_stage=int(r.get("zero_stage") or 3))     # reports before the column: stage 3

    def step(key):
        return float(rows[key]["step_s"])
    def alone(k):                             # (activation elements, 1, S - products - AdamW) at W = 1, replicated
        t = plan(setup((k, 1, "replicated")), CPU).time
        return activation_elements(setup((k, 1, "replicated"))), 1.0, step((k, 1, "replicated")) - t["flops"] / flops - t["optimiser"]
    element_s, step_overhead = solve2(alone(small), alone(size))
    def zero3_over_replicated(k):              # (frozen bytes, hooked modules x passes, S_zero3 - S_replicated) at W = 1
        z, r = setup((k, 1, "zero3")), setup((k, 1, "replicated"))
        return (gathers(z)["elements"] * DTYPE_BYTES[z.dtype], 2 * (hooked_modules(z) - hooked_modules(r)),
                step((k, 1, "zero3")) - step((k, 1, "replicated")))
    # the difference = frozen bytes x c + hooked modules x passes x t_mod at both sizes (c = 1 / copy bandwidth)
    c, t_mod = solve2(zero3_over_replicated(small), zero3_over_replicated(size))
    if c <= 0 or t_mod < 0:                   # noise beyond the small size's difference: the large one alone
        bl, _, dl = zero3_over_replicated(size)
        c, t_mod = dl / bl, 0.0
    copy_bandwidth = 1 / c
    one = dataclasses.replace(CPU, flops=flops, latency=latency, element_s=element_s, step_overhead_s=step_overhead,
                              module_overhead_s=t_mod, copy_bandwidth=None, busy_slowdown=1.0, sync_overhead_s=0.0)

    def shared_cores(k, hw):                  # (compute + element-wise, 1, S - everything else planned) at W = 2
        t = plan(setup((k, 2, "replicated")), hw).time
        busy_part = t["compute"] + t["elementwise"]
        return busy_part, 1.0, step((k, 2, "replicated")) - (t["step"] - busy_part)

    def communication(k, hw):                 # (bytes moved, collective calls, S - everything else planned) at W = 2
        s, free = setup((k, 2, "zero3")), dataclasses.replace(hw, bandwidth=1e30, latency=0.0)
        rest = plan(s, free).time["step"]
        moved = plan(s, dataclasses.replace(free, bandwidth=1.0)).time["step"] - rest     # seconds at 1 B/s
        calls = plan(s, dataclasses.replace(free, latency=1.0)).time["step"] - rest
        return moved, calls, step((k, 2, "zero3")) - rest
    # S - the rest = k_busy x (compute + element-wise) + t_sync at both sizes (replicated), and = bytes / BW +
    # calls x lat (zero3); each pair leans on the other's constants a little: solved in turns until they settle
    bandwidth, latency_fit = CPU.bandwidth, latency
    for _ in range(8):
        busy, sync = solve2(*(shared_cores(k, dataclasses.replace(one, bandwidth=bandwidth, latency=latency_fit))
                              for k in (small, size)))
        two = dataclasses.replace(one, busy_slowdown=busy, sync_overhead_s=sync)
        per_byte, latency_fit = solve2(*(communication(k, two) for k in (small, size)))
        if per_byte <= 0 or latency_fit < 0:  # noise beyond the small size's gathers: the large size's alone
            moved, calls, left = communication(size, dataclasses.replace(two, latency=latency))
            per_byte, latency_fit = (left - calls * latency) / moved, latency
        bandwidth = 1 / per_byte

    unit = dataclasses.replace(CPU, activation_factor=1.0, gathered_factor=1.0, runtime_bytes=0.0, comm_bytes=0.0,
                               stage3_activation_factor=None)
    r1 = ranks((size, 1, "replicated"))[0]
    m1 = memory(setup((size, 1, "replicated"), longest=True), unit)
    runtime = r1["setup_memory"]["rss_mib"] * 2**20 - m1["frozen"] - m1["trainable"]
    a_act = (r1["memory"]["peak_rss_mib"] - r1["setup_memory"]["rss_mib"]) * 2**20 / m1["activations"]
    z1 = ranks((size, 1, "zero3"))[0]
    a_act3 = ((z1["memory"]["peak_rss_mib"] - z1["setup_memory"]["rss_mib"]) * 2**20
              / memory(setup((size, 1, "zero3"), longest=True), unit)["activations"])

    def peak(key):
        return max(x["memory"]["peak_rss_mib"] for x in ranks(key)) * 2**20
    m2 = memory(setup((small, 2, "replicated"), longest=True), unit)
    comm = peak((small, 2, "replicated")) - (runtime + m2["frozen"] + m2["trainable"] + a_act * m2["activations"])
    m3 = memory(setup((size, 2, "zero3"), longest=True), unit)
    a_gat = (peak((size, 2, "zero3")) - (runtime + comm + m3["frozen"] + m3["trainable"] + a_act3 * m3["activations"])) / m3["gathered"]
    return {"flops": flops, "latency": latency_fit, "element_s": element_s, "step_overhead_s": step_overhead,
            "module_overhead_s": t_mod, "copy_bandwidth": copy_bandwidth, "busy_slowdown": busy,
            "sync_overhead_s": sync, "bandwidth": bandwidth,
            "runtime_bytes": runtime, "activation_factor": a_act, "stage3_activation_factor": a_act3,
            "comm_bytes": comm, "gathered_factor": a_gat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--fit", metavar="REPORT", help="a cora scale report directory: fit the step-level constants")
    ap.add_argument("--size", help="with --fit: the size whose four points to fit on")
    ap.add_argument("--small", default="tiny-llama", help="with --fit: the small size (its 1-worker replicated point)")
    ap.add_argument("--flops", type=float, help="with --fit: F, calibrate's FLOP/s (default: measured now)")
    ap.add_argument("--latency", type=float, default=0.29e-3,
                    help="with --fit: seconds per gather call to start the fit of the latency from")
    args = ap.parse_args()
    if args.fit:
        if not args.size:
            raise SystemExit("--fit needs --size (the size whose points to fit on)")
        torch.set_num_threads(1)
        out = fit(args.fit, args.size, args.small, args.flops or matmul_flops(), args.latency)
        print(json.dumps({k: float(f"{v:.4g}") for k, v in out.items()}), file=sys.stdout)
        return
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    bandwidth, latency = gather_constants()
    out = {"flops": matmul_flops(), "bandwidth": bandwidth, "latency": latency,
           "optim_s_per_param": adamw_s_per_param()}
    print(json.dumps({k: float(f"{v:.4g}") for k, v in out.items()}), file=sys.stdout)


if __name__ == "__main__":
    main()
