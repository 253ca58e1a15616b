"""The planner's machine constants (cora.plan.Hardware), measured on this machine, one thread per rank.

    python benchmarks/calibrate.py --json

  flops              FLOP/s of one thread on float32 matrix products of a training step's shapes
                     (tokens 768 x hidden 1024 x 2816, and x 1024): the median of 2 m k n / time
  bandwidth          bytes/s a rank receives in a 2-rank gloo all-gather of 16 MiB (1 - 1/W of it moves)
  latency            seconds of a 2-rank gloo all-gather of 4 KiB (the per-collective cost)
  optim_s_per_param  torch AdamW (foreach) step seconds per parameter, over 4M fp32 parameters
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch


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
    opt = torch.optim.AdamW([p], lr=1e-3)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    bandwidth, latency = gather_constants()
    out = {"flops": matmul_flops(), "bandwidth": bandwidth, "latency": latency,
           "optim_s_per_param": adamw_s_per_param()}
    print(json.dumps({k: float(f"{v:.4g}") for k, v in out.items()}), file=sys.stdout)


if __name__ == "__main__":
    main()
