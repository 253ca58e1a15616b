"""Per-sample injection: exactness against merged weights, zero-init identity, independence, bad input."""

import copy
import math

import pytest
import torch
from torch import nn

from cora.injection import Injection, InjectionConfig, MLP_TARGETS, adapter_dropout, dense_weight, drop_positions
from cora.scoring import CoRAModel, collate

from .conftest import SMALL_GEN, randomise_p, tiny

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(tokenizer, n=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["a short prompt #Answer:", "another, longer prompt about a movie #Answer:", "x #Answer:"]
    prompts = [tokenizer(texts[i % 3]).input_ids for i in range(n)]
    return collate(prompts, torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g),
                   torch.randint(0, 2, (n,), generator=g).float(), tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def test_zero_init_reproduces_frozen_llm_exactly(family, tokenizer, yes_id):
    llm = tiny(family)
    ref = copy.deepcopy(llm)
    targets = ALL if family != "tiny-gpt2" else [t for t in ALL if t != "gate_proj"]
    model = CoRAModel(llm, yes_id, 8, 8, InjectionConfig(targets=targets), SMALL_GEN).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        got = model(batch)
        hidden_ref = ref.base_model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        hidden_got = model.backbone(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        full = ref(input_ids=batch.input_ids).logits                       # (B, T, V) reference head
    assert torch.equal(hidden_got, hidden_ref)                              # bit-identical at P = 0
    want = full[torch.arange(3), batch.lengths - 1, yes_id]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,targets", [("tiny-llama", ALL), ("tiny-qwen2", ALL),
                                            ("tiny-gpt2", [t for t in ALL if t != "gate_proj"])])
@pytest.mark.parametrize("per_layer", [False, True])
def test_injected_layer_equals_explicit_merged_weight(family, targets, per_layer, tokenizer, yes_id):
    model = CoRAModel(tiny(family), yes_id, 8, 8, InjectionConfig(targets=targets, per_layer=per_layer),
                      SMALL_GEN).eval()
    randomise_p(model)
    batch = _batch(tokenizer)
    model.injection.set_weights(model.generator.weights(batch.user_emb, batch.item_emb))
    seen = set()
    for m in model.injection.modules:
        x = torch.randn(3, 5, m.in_features)
        with torch.no_grad():
            y = m(x)
            for b in range(3):
                w = m.merge(b)                                              # (out, in)
                assert w.shape == (m.out_features, m.in_features)
                want = x[b] @ w.t() + (m.base.bias if m.base.bias is not None else 0)
                torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-5)
        seen.add(type(m.base).__name__)
    assert seen == ({"Conv1D"} if family == "tiny-gpt2" else {"Linear"})


@pytest.mark.parametrize("family,targets", [("tiny-llama", ALL), ("tiny-qwen2", ALL),
                                            ("tiny-gpt2", [t for t in ALL if t != "gate_proj"])])
@pytest.mark.parametrize("per_layer", [False, True])
def test_injected_forward_applies_alpha_over_r_to_the_raw_generated_a(family, targets, per_layer, tokenizer,
                                                                      yes_id):
    """y_b = x_b (W + (alpha/r) P A_b^T)^T + bias, with A_b the generator's own (unscaled) output and
    alpha != r: checks the scale independently of the pre-scaled A that merge() and the bmm path share
    (a swapped r/alpha would give 1/8 where 8 is expected)."""
    cfg = InjectionConfig(rank=4, alpha=32.0, dropout=0.0, targets=targets, per_layer=per_layer)
    model = CoRAModel(tiny(family), yes_id, 8, 8, cfg, SMALL_GEN).eval()
    randomise_p(model)
    g = torch.Generator().manual_seed(5)
    user, item = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    with torch.no_grad():
        raw = model.generator.weights(user, item)          # {d_in: (B, [L,] d_in, r)}, as generated
        model.injection.set_weights(raw)
    scale = cfg.alpha / cfg.rank                           # 32 / 4 = 8
    for m in model.injection.modules:
        x = torch.randn(3, 5, m.in_features, generator=g)  # (B, T, d_in)
        with torch.no_grad():
            y = m(x)                                       # (B, T, d_out)
            for b in range(3):
                a = raw[m.in_features][b]
                a = a[m.layer_index] if per_layer else a   # (d_in, r)
                assert a.shape == (m.in_features, cfg.rank)
                bias = m.base.bias if m.base.bias is not None else 0
                frozen = x[b] @ dense_weight(m.base).t() + bias
                want = x[b] @ (dense_weight(m.base) + scale * m.lora_P @ a.t()).t() + bias
                assert (want - frozen).abs().max() > 0.1    # the update is large enough to be seen
                torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-5)


def test_lora_forward_applies_alpha_over_r_to_its_a(yes_id):
    """The 'lora' baseline: y = x (W + (alpha/r) P A)^T with A the module's raw lora_A (r, d_in)."""
    cfg = InjectionConfig(adapter="lora", rank=4, alpha=32.0, dropout=0.0)
    model = CoRAModel(tiny(), yes_id, 8, 8, cfg).eval()
    randomise_p(model)
    g = torch.Generator().manual_seed(6)
    for m in model.injection.modules:
        x = torch.randn(2, 5, m.in_features, generator=g)  # (B, T, d_in)
        with torch.no_grad():
            bias = m.base.bias if m.base.bias is not None else 0
            want = x @ (dense_weight(m.base) + (cfg.alpha / cfg.rank) * m.lora_P @ m.lora_A).t() + bias
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
            assert (want - x @ dense_weight(m.base).t() - bias).abs().max() > 0.1


def test_whole_model_matches_per_sample_merged_models(tokenizer, yes_id):
    """The batched forward equals, for each sample, a plain LLM whose weights were merged for it."""
    llm = tiny("tiny-llama")
    plain = copy.deepcopy(llm)
    model = CoRAModel(llm, yes_id, 8, 8, InjectionConfig(targets=ALL, per_layer=True), SMALL_GEN).eval()
    randomise_p(model, std=0.3)
    batch = _batch(tokenizer)
    with torch.no_grad():
        got = model(batch)
        names = {id(m): n for n, m in model.llm.named_modules()}
        for b in range(3):
            merged = copy.deepcopy(plain)
            for m in model.injection.modules:
                path = names[id(m)]
                merged.get_submodule(path).weight.copy_(m.merge(b))
            ids = batch.input_ids[b:b + 1, : batch.lengths[b]]
            want = merged(input_ids=ids).logits[0, -1, yes_id]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_samples_are_independent(tokenizer, yes_id):
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), SMALL_GEN).eval()
    randomise_p(model)
    batch = _batch(tokenizer, n=4)
    with torch.no_grad():
        before = model(batch)
        batch.user_emb[2] += 3.0
        batch.item_emb[2] -= 1.0
        after = model(batch)
    for i in (0, 1, 3):
        assert torch.equal(before[i], after[i])
    assert not torch.equal(before[2], after[2])


def test_training_changes_only_generator_and_p(tokenizer, yes_id):
    torch.manual_seed(0)
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(dropout=0.0), SMALL_GEN)
    llm_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    train_before = [p.detach().clone() for p in model.trainable_parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    batch = _batch(tokenizer, n=4)
    model.train()
    for _ in range(3):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.llm.named_parameters())
    assert llm_before and all(torch.equal(after[n], p) for n, p in llm_before.items())
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)
    changed = [not torch.equal(a, b) for a, b in zip(train_before, model.trainable_parameters())]
    assert all(changed)
    first = model.generator.qformer.encoder.layer[0]
    grads = [p.grad for p in first.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.generator.queries.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg,match", [
    (InjectionConfig(targets=["q_proj", "qq_proj"]), r"unknown target modules \['qq_proj'\]"),
    (InjectionConfig(rank=0), "rank must be a positive integer, got 0"),
    (InjectionConfig(rank=-4), "got -4"),
    (InjectionConfig(targets=[]), "targets is empty"),
])
def test_bad_injection_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        Injection(tiny(), cfg)


def test_architecture_without_the_target_modules():
    with pytest.raises(ValueError, match=r"gpt2 has no modules for targets \['gate_proj'\]"):
        Injection(tiny("tiny-gpt2"), InjectionConfig(targets=["gate_proj"]))
    with pytest.raises(ValueError, match="target all of q_proj, k_proj, v_proj"):
        Injection(tiny("tiny-gpt2"), InjectionConfig(targets=["q_proj"]))

    class Other(nn.Module):
        config = type("C", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="'bert' is not supported"):
        Injection(Other(), InjectionConfig())


def test_embedding_mismatch_and_empty_batch(tokenizer, yes_id):
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), SMALL_GEN)
    batch = _batch(tokenizer)
    batch.user_emb = torch.randn(3, 16)
    with pytest.raises(ValueError, match="embedding size mismatch: got user 16, item 8.*built for user 8"):
        model(batch)
    with pytest.raises(ValueError, match="empty batch"):
        collate([], torch.zeros(0, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="empty batch"):
        model.generator(torch.zeros(0, 8), torch.zeros(0, 8))


def test_mlp_down_proj_gets_its_own_width(tokenizer, yes_id):
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(targets=list(MLP_TARGETS)), SMALL_GEN)
    assert model.injection.widths == {64, 128}                       # hidden and intermediate widths
    out = model.generator.weights(torch.randn(2, 8), torch.randn(2, 8))
    assert out[64].shape == (2, 64, 16) and out[128].shape == (2, 128, 16)
    flat = out[128].flatten(1)
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(2))       # L2-normalised over the whole A


def test_lora_baseline_has_no_generator_and_trains_a(tokenizer, yes_id):
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(adapter="lora"))
    assert model.generator is None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_A") for n in names) and any(n.endswith("lora_P") for n in names)
    m = model.injection.modules[0]
    with torch.no_grad():
        m.lora_P.normal_()
    x = torch.randn(2, 3, m.in_features)
    m.eval()
    torch.testing.assert_close(m(x), x @ m.merge().t(), rtol=1e-5, atol=1e-5)
    assert dense_weight(m.base).shape == (m.out_features, m.in_features)


@pytest.mark.parametrize("adapter", ["cora", "lora"])
def test_a_bf16_llm_trains_fp32_adapters(adapter, tokenizer, yes_id):
    """ZeRO-3 with bf16 leaves the adapters as created (fp32) and the LLM built under zero.Init in bf16
    (DeepSpeed casts no parameter of such a model): the low-rank path casts to the activations' dtype
    and its fp32 parameters get finite gradients (the LoRA baseline failed here, found preparing the first
    GPU run)."""
    model = CoRAModel(tiny().to(torch.bfloat16), yes_id, 8, 8, InjectionConfig(adapter=adapter, rank=4), SMALL_GEN)
    randomise_p(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    loss, logits = model.loss(_batch(tokenizer))
    assert torch.isfinite(loss) and model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    loss.backward()
    for m in model.injection.modules:
        for p in [m.lora_P] + ([m.lora_A] if adapter == "lora" else []):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0


def test_injection_config_reports_every_problem_at_once():
    from cora.config import ConfigError, from_dict
    with pytest.raises(ConfigError) as err:
        from_dict(InjectionConfig, {"rank": 0, "targets": ["q_proj", "qkv"], "alpah": 3.0, "dropout": 1.5})
    text = str(err.value)
    assert "rank must be a positive integer, got 0" in text and "unknown target modules ['qkv']" in text
    assert "did you mean 'alpha'" in text and "dropout must be in [0, 1), got 1.5" in text


def test_cpu_adapter_dropout_is_an_unbiased_independent_dropout():
    x = torch.ones(64, 128, 96, requires_grad=True)
    torch.manual_seed(3)
    h, factor = adapter_dropout(x, 0.05, training=True)
    kept = (h != 0).float()
    assert abs(kept.mean().item() - (1 - 0.05)) < 0.002                # rate p: sd 0.00025 here
    assert factor == pytest.approx(1 / (1 - 0.05))                     # unbiased after the factor
    # neighbouring elements are not correlated
    flat = kept.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(corr.item()) < 0.01
    torch.manual_seed(3)
    again, _ = adapter_dropout(x, 0.05, training=True)
    assert torch.equal(again, h)                                        # seeded by torch.manual_seed
    other, _ = adapter_dropout(x, 0.05, training=True)
    assert not torch.equal(other, h)                                    # fresh mask per call
    h.sum().backward()
    assert torch.equal(x.grad, kept)                                    # gradient flows only where kept
    same, one = adapter_dropout(x, 0.05, training=False)
    assert same is x and one == 1.0


@pytest.mark.parametrize("p", [0.05, 0.2, 0.9])
def test_drop_positions_are_independent_bernoulli_trials(p):
    """The drops of n trials: binomial count (mean n p, variance n p (1-p): a mask too regular or too clumped
    fails), the same rate at every position (the first, middle and last element), and a first drop at
    position g with probability (1-p)^g p; positions sorted, distinct and inside [0, n)."""
    torch.manual_seed(11)
    n, calls = 1000, 4000
    counts, hits, first = [], torch.zeros(n), []
    for _ in range(calls):
        pos = drop_positions(n, p)
        assert pos.dtype == torch.int64 and (pos.diff() > 0).all() and (pos.numel() == 0 or 0 <= pos[0] <= pos[-1] < n)
        counts.append(pos.numel())
        hits[pos] += 1
        first.append(int(pos[0]) if pos.numel() else n)
    counts = torch.tensor(counts, dtype=torch.float64)
    sd_mean = math.sqrt(n * p * (1 - p) / calls)
    assert abs(counts.mean().item() - n * p) < 5 * sd_mean
    assert 0.85 < counts.var().item() / (n * p * (1 - p)) < 1.15
    for at in (0, n // 2, n - 1):
        assert abs(hits[at].item() / calls - p) < 5 * math.sqrt(p * (1 - p) / calls)
    first = torch.tensor(first)
    for g in range(3):
        want = (1 - p) ** g * p
        assert abs((first == g).double().mean().item() - want) < 5 * math.sqrt(want * (1 - want) / calls) + 1e-3


def test_drop_positions_drawn_in_small_chunks_are_the_same_positions():
    """The draws continue where they stopped: in chunks of 3 uniforms (many rounds) the same seed gives the
    same positions as in one chunk; n = 1 and p near 1 are covered."""
    for n, p in ((1000, 0.05), (1, 0.5), (50, 0.999)):
        torch.manual_seed(5)
        whole = drop_positions(n, p)
        torch.manual_seed(5)
        assert torch.equal(drop_positions(n, p, chunk=3), whole)


def test_activation_checkpointing_recomputes_the_same_dropout(tokenizer, yes_id):
    """With dropout 0.3 on every target, a step under (non-reentrant) activation checkpointing gives the loss and
    gradients of the plain step from the same seed: the recomputation in backward drops the same elements
    (``drop_positions`` draws from the generator that checkpointing restores). A different mask in the
    recomputation would give other gradients; a different seed gives other ones, which the test also checks."""
    def grads(checkpointing: bool, seed: int = 7):
        llm = tiny("tiny-llama")
        if checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = CoRAModel(llm, yes_id, 8, 8, InjectionConfig(targets=ALL, dropout=0.3), SMALL_GEN).train()
        randomise_p(model)
        torch.manual_seed(seed)
        loss, _ = model.loss(_batch(tokenizer))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert plain.keys() == ckpt.keys() and any("lora_P" in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-6), n
    _, other = grads(False, seed=8)
    assert any(not torch.allclose(plain[n], other[n], rtol=1e-4, atol=1e-6) for n in plain if "lora_P" in n)


def test_the_loss_ignores_weight_zero_padding_samples(tokenizer, yes_id):
    """The epoch plan pads a short rank's last batch with weight-0 copies: the loss of the padded batch
    equals the plain mean BCE of its real samples, whatever the padding's label."""
    torch.manual_seed(0)
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(dropout=0.0), SMALL_GEN).eval()
    randomise_p(model)
    real = _batch(tokenizer, n=3)
    ids = torch.cat([real.input_ids, real.input_ids[:1]])
    padded = collate([row[:n].tolist() for row, n in zip(ids, torch.cat([real.lengths, real.lengths[:1]]))],
                     torch.cat([real.user_emb, real.user_emb[:1]]), torch.cat([real.item_emb, real.item_emb[:1]]),
                     torch.cat([real.labels, 1 - real.labels[:1]]), tokenizer.pad_token_id,
                     weights=[1.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        want = nn.functional.binary_cross_entropy_with_logits(model(real), real.labels)
        got, logits = model.loss(padded)
        unweighted, _ = model.loss(collate([row[:n].tolist() for row, n in zip(padded.input_ids, padded.lengths)],
                                           padded.user_emb, padded.item_emb, padded.labels, tokenizer.pad_token_id))
    assert logits.shape == (4,)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(unweighted, want, atol=1e-3)


def test_a_batch_from_an_actors_arrays_keeps_every_field(tokenizer):
    import numpy as np

    from cora.scoring import Batch
    b = _batch(tokenizer)
    arrays = {"input_ids": b.input_ids.numpy(), "lengths": b.lengths.numpy(), "user_emb": b.user_emb.numpy(),
              "item_emb": b.item_emb.numpy(), "labels": b.labels.numpy(), "weights": np.ones(3, np.float32),
              "sample_ids": np.arange(3)}
    got = Batch.from_arrays(arrays)
    for f in ("input_ids", "lengths", "user_emb", "item_emb", "labels"):
        assert torch.equal(getattr(got, f), getattr(b, f)), f
    assert torch.equal(got.weights, torch.ones(3)) and b.weights is None


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_one_down_projection_per_group_and_layer_and_nothing_cached_after(tokenizer, yes_id, checkpointing):
    """q/k/v (and gate/up) share one dropout(x) @ A per layer forward: counted, not assumed; the shared
    z lives only inside its parent's forward (activation checkpointing recomputes it once in backward)."""
    llm = tiny("tiny-llama")
    if checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = CoRAModel(llm, yes_id, 8, 8, InjectionConfig(targets=ALL, dropout=0.3), SMALL_GEN).train()
    randomise_p(model)
    groups = model.injection.groups
    layers = model.injection.num_layers
    assert len(groups) == 4 * layers            # per layer: {q,k,v}, {o}, {gate,up}, {down}
    assert sorted(g.members for g in groups[:4]) == [1, 1, 2, 3]
    loss, _ = model.loss(_batch(tokenizer))
    assert [g.computed for g in groups] == [1] * len(groups)
    assert all(g.z is None for g in groups)      # nothing kept after the layers ran
    loss.backward()
    assert [g.computed for g in groups] == [2 if checkpointing else 1] * len(groups)
    model.injection.release()                    # what train_step does after backward
    assert all(g.z is None for g in groups)
    # a member called on its own (outside its parent's forward) computes alone and keeps nothing
    q = next(m for m in model.injection.modules if m.shared.members == 3)
    with torch.no_grad():
        q(torch.randn(3, 5, q.in_features))
    assert q.shared.z is None
