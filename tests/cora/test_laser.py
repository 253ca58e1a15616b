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


def _laser(num_items=6):
    from cora.export import build_model
    section = {"experts": 3, "queries": 2, "blocks": 2, "hidden_size": 16, "heads": 2, "dropout": 0.0,
               "history": 4, "num_items": num_items}
    model, tok = build_model({"method": "laser", "laser": section, "llm": {"name": "tiny-llama"}, "injection": {},
                              "generator": {}, "cf_dim": 8})
    return model.eval(), tok


def _laser_batch(tok, n=4, seed=0):
    import numpy as np

    from cora.laser import history_embeddings
    from cora.prompts import PromptEncoder, get_template
    from cora.scoring import collate
    g = np.random.default_rng(seed)
    enc = PromptEncoder(tok, get_template("laser-movies"), max_history=3, max_length=256)
    items_cf = g.standard_normal((6, 8)).astype("float32")
    histories = [[1, 2, 3], [], [4], [0, 5, 1, 2, 3]]
    batch = collate([enc.encode([f"T{i}" for i in h], "") for h in histories], items_cf[:n], items_cf[:n],
                    [1.0, 0.0, 1.0, 1.0], tok.pad_token_id)
    batch.items = torch.tensor([0, 3, 5, 2])
    emb, pad = history_embeddings(histories, items_cf, 4, 8)
    batch.history_emb, batch.history_pad = torch.from_numpy(emb), torch.from_numpy(pad)
    return batch, items_cf


def test_laser_reads_its_suffix_token_after_the_prefix_and_prompt_and_scores_by_cosine():
    model, tok = _laser()
    batch, _ = _laser_batch(tok)
    with torch.no_grad():
        model.item_table.copy_(torch.randn(6, model.item_table.shape[1], generator=torch.Generator().manual_seed(1)))
        h = model(batch, represent=True)
        prefix, _, _ = model.mformer(batch.history_emb, batch.history_pad)
        embed = model.llm.get_input_embeddings()
        for row in range(4):                       # the LLM on [prefix, the prompt's real tokens, suffix], by hand
            n = int(batch.lengths[row])
            x = torch.cat([prefix[row], embed(batch.input_ids[row, :n]), model.suffix.weight[None]])[None]
            want = model.backbone(inputs_embeds=x).last_hidden_state[0, -1]
            assert torch.allclose(h[row], want, atol=1e-5), row
        scores = model(batch)
        assert torch.allclose(scores, torch.nn.functional.cosine_similarity(h, model.item_table[batch.items]), atol=1e-6)


def test_laser_trains_the_mformer_and_suffix_on_a_softmax_over_all_items_of_its_positives():
    from cora.laser import item_batch
    from cora.prompts import domain_encoders
    model, tok = _laser()
    batch, items_cf = _laser_batch(tok)
    with torch.no_grad():
        model.item_table.copy_(torch.randn(6, model.item_table.shape[1], generator=torch.Generator().manual_seed(2)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("mformer.", "suffix.")) for n in trainable)
    model.train()
    loss, _ = model.loss(batch)
    with torch.no_grad():
        torch.manual_seed(0)
        h = model(batch, represent=True)
        sims = torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(model.item_table, dim=-1).T
        ce = torch.nn.functional.cross_entropy(sims / 0.05, batch.items, reduction="none")
        want = (ce * batch.labels).sum() / batch.labels.sum() + 0.01 * model.balance     # the label-0 row counts 0
    assert torch.allclose(loss, want, atol=1e-4), (loss, want)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("llm."))
    assert model.suffix.weight.grad.abs().sum() > 0 and model.mformer.out.weight.grad.abs().sum() > 0
    # an item is encoded as a one-item history: its title in the prompt, its CF embedding for the M-Former
    encoders = domain_encoders(tok, "laser-", ["movies"], 3, 256)
    items = item_batch(encoders, [f"T{i}" for i in range(6)], ["movies"] * 6, items_cf, [4, 1], tok.pad_token_id)
    assert items.input_ids[0, :items.lengths[0]].tolist() == encoders["movies"].encode(["T4"], "")
    assert torch.equal(items.history_emb[:, 0], torch.from_numpy(items_cf[[4, 1]])) and not items.history_pad.any()
