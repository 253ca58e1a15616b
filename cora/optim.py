"""Optimiser and learning-rate schedule of CoRA (DESIGN.md section 2).

AdamW (0.9, 0.999), weight decay 1e-3; the learning rate warms up linearly from ``lr_start`` to
``lr_peak`` over ``warmup_steps``, then follows a cosine from ``lr_peak`` down to ``lr_end`` at
``total_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """AdamW and the warm-up + cosine schedule."""

    lr_peak: float = 1e-3
    """Learning rate at the end of warm-up."""
    lr_start: float = 1e-5
    """Learning rate at step 0."""
    lr_end: float = 8e-5
    """Learning rate at the last step."""
    warmup_steps: int = 200
    """Linear warm-up length in optimiser steps."""
    weight_decay: float = 1e-3
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    fused: bool = True
    """torch's fused AdamW kernel (one pass over each tensor, on the CPU as on CUDA) instead of its
    per-tensor loop: the same update to rounding, about 9x faster on this project's CPU (0.6-0.8 ns per
    parameter against 6-10 ns, one thread, ``benchmarks/calibrate.py``'s ``optim_s_per_param``); DeepSpeed
    hands the optimiser the paper generator's 38M parameters as one flat partition. False: the loop (a
    device or dtype the kernel lacks)."""

    def validate(self) -> list[str]:
        problems = [f"{k} must be > 0, got {getattr(self, k)}" for k in ("lr_peak", "lr_start", "lr_end")
                    if getattr(self, k) <= 0]
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        return problems


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr_start + (cfg.lr_peak - cfg.lr_start) * step / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_end + 0.5 * (cfg.lr_peak - cfg.lr_end) * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig, total_steps: int):
    """(AdamW, LambdaLR) over ``params``; the scheduler is stepped once per optimiser step."""
    opt = torch.optim.AdamW(params, lr=cfg.lr_peak, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=cfg.fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, cfg) / cfg.lr_peak)
    return opt, sched
