"""cora.optim: the fused AdamW takes the same steps as torch's per-tensor loop; the schedule's shape."""

import pytest
import torch

from cora.optim import OptimConfig, build_optimizer, lr_at


def _train(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1000, 37, 1)]
    opt, sched = build_optimizer(params, OptimConfig(fused=fused, warmup_steps=2, lr_peak=1e-2), steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
    return [p.detach().clone() for p in params]


def test_the_fused_adamw_is_the_default_and_steps_like_the_loop():
    assert build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(), 10)[0].defaults["fused"] is True
    assert build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(fused=False), 10)[0].defaults["fused"] \
        is None
    fused, loop = _train(True), _train(False)
    moved = _train(True, steps=0)
    for a, b, start in zip(fused, loop, moved):
        assert not torch.equal(a, start)                           # it trained
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)        # the same update, to rounding


def test_the_schedule_warms_up_linearly_then_follows_the_cosine_down():
    cfg = OptimConfig(warmup_steps=4, lr_start=1e-5, lr_peak=1e-3, lr_end=1e-4)
    assert lr_at(0, 20, cfg) == pytest.approx(1e-5)
    assert lr_at(2, 20, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(4, 20, cfg) == pytest.approx(1e-3)
    assert lr_at(12, 20, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))     # half-way down the cosine
    assert lr_at(20, 20, cfg) == pytest.approx(1e-4)
