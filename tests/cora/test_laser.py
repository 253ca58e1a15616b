"""Laser's M-Former (cora.laser) against direct computations: routing, top-1 selection, the balance loss."""

import pytest
import torch

from cora.laser import MFormer, MFormerConfig, balance_loss

SMALL = MFormerConfig(experts=4, queries=3, blocks=2, hidden_size=16, heads=2, dropout=0.0)


def _inputs(b=5, t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(b, t, d, generator=g)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 4:] = True                           # a short history
    pad[2, :] = True                            # no history at all
    return history, pad


def test_routing_averages_the_router_over_the_real_history_items_only():
    torch.manual_seed(0)
    m = MFormer(SMALL, 8, 12).eval()
    history, pad = _inputs()
    gates = m.route(history, pad)
    for b in range(history.shape[0]):
        real = history[b][~pad[b]]
        logits = m.router(real).mean(0) if len(real) else m.router.bias
        assert torch.allclose(gates[b], torch.softmax(logits, -1), atol=1e-6), b
    changed = history.clone()
    changed[1, 4:] = 100.0                      # padding is never read
    assert torch.equal(m.route(changed, pad), gates)


def test_each_user_gets_the_prefix_of_its_top1_expert_scaled_by_its_gate():
    torch.manual_seed(1)
    m = MFormer(SMALL, 8, 12).eval()
    history, pad = _inputs()
    with torch.no_grad():
        prefix, _, expert = m(history, pad)
        assert prefix.shape == (5, 3, 12) and torch.isfinite(prefix).all()      # also the user without history
        assert torch.equal(expert, m.route(history, pad).argmax(-1))
        others = [k for k in range(SMALL.experts) if k not in expert.tolist()]
        if others:                               # an expert no user chose does not change any prefix
            m.queries[others] += 5.0
            assert torch.allclose(m(history, pad)[0], prefix, atol=1e-6)
        m.queries[expert[0]] += 1.0              # the chosen expert's queries do
        assert not torch.allclose(m(history, pad)[0][0], prefix[0])


def test_the_router_learns_through_the_gate_and_unchosen_experts_get_no_gradient():
    torch.manual_seed(2)
    m = MFormer(SMALL, 8, 12)
    history, pad = _inputs()
    prefix, balance, expert = m(history, pad)
    (prefix.square().mean() + 0.01 * balance).backward()
    assert m.router.weight.grad.abs().sum() > 0
    chosen = set(expert.tolist())
    for k in range(SMALL.experts):
        assert (m.queries.grad[k].abs().sum() > 0) == (k in chosen), k


def test_balance_loss_is_k_sum_share_times_mean_gate():
    k = 4
    one_hot = torch.eye(k)[torch.zeros(8, dtype=torch.long)]          # everyone certain of expert 0
    assert balance_loss(one_hot, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(k)
    uniform = torch.full((8, k), 1 / k)
    balanced = torch.arange(8) % k
    assert balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    g = torch.softmax(torch.randn(6, k, generator=torch.Generator().manual_seed(3)), -1)
    e = g.argmax(-1)
    want = k * sum((e == j).float().mean() * g[:, j].mean() for j in range(k))
    assert balance_loss(g, e).item() == pytest.approx(want.item(), rel=1e-6)


def test_bad_sizes_are_refused_with_the_value():
    with pytest.raises(ValueError, match="heads=3 must divide hidden_size=16"):
        MFormer(MFormerConfig(hidden_size=16, heads=3), 8, 12)
    with pytest.raises(ValueError, match="experts must be >= 1, got 0"):
        MFormer(MFormerConfig(experts=0), 8, 12)
