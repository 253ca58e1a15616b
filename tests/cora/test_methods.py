"""cora.methods: one strategy per method, chosen by name; CoRA unchanged by the abstraction."""

import math

import pytest
import torch

from cora.config import ConfigError, from_dict
from cora.export import build_model
from cora.injection import InjectionConfig
from cora.methods import METHODS, get_method, method_of
from cora.scoring import CoRAModel, collate
from trainer.config import TrainConfig

from .conftest import SMALL_GEN, tiny


def _batch(tokenizer, n=4):
    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer(f"prompt {i} #Answer:").input_ids for i in range(n)]
    return collate(prompts, torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g),
                   torch.ones(n), tokenizer.pad_token_id)


def test_cora_is_the_default_and_builds_exactly_what_it_built_before(yes_id):
    torch.manual_seed(5)
    implicit = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), SMALL_GEN)
    torch.manual_seed(5)
    explicit = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), SMALL_GEN, method="cora")
    assert implicit.method.name == explicit.method.name == "cora"
    a, b = dict(implicit.named_parameters()), dict(explicit.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = {n for n, p in implicit.named_parameters() if p.requires_grad}
    assert {id(p) for p in implicit.trainable_parameters()} == {id(p) for n, p in implicit.named_parameters()
                                                                if n in names}
    assert any(n.startswith("generator.") for n in names) and not any("lora_A" in n for n in names)


def test_tallrec_trains_lora_a_and_p_and_ignores_the_cf_embeddings(tokenizer, yes_id):
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), SMALL_GEN, method="tallrec").eval()
    assert model.generator is None and not get_method("tallrec").uses_cf
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_P")) for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters()
                                                             if n in trainable}
    with torch.no_grad():
        for m in model.injection.modules:
            m.lora_P.normal_()
        batch = _batch(tokenizer)
        other = _batch(tokenizer)
        other.user_emb, other.item_emb = -batch.user_emb, batch.item_emb * 3     # other CF input, same prompts
        assert torch.equal(model(batch), model(other))


def test_unknown_methods_and_contradicting_adapters_are_refused():
    with pytest.raises(ValueError, match="unknown method .collm2.; available: cora, tallrec, collm, reccocktail, laser, bdlm"):
        get_method("collm2")
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"method": "cora", "injection": {"adapter": "lora"}})
    assert "contradicts method='cora'" in str(err.value) and "set method=tallrec" in str(err.value)
    with pytest.raises(ConfigError, match="method"):
        from_dict(TrainConfig, {"method": "bdlm2"})
    assert from_dict(TrainConfig, {"method": "tallrec"}).method == "tallrec"
    assert sorted(METHODS) == ["bdlm", "collm", "cora", "laser", "reccocktail", "tallrec"]


def test_saved_configs_name_their_method_and_older_ones_are_read_by_their_adapter(yes_id):
    assert method_of({"method": "tallrec"}) == "tallrec"
    assert method_of({"injection": {"adapter": "lora"}}) == "tallrec"     # an export from before methods
    assert method_of({"injection": {"adapter": "cora"}}) == method_of({}) == "cora"
    model, _ = build_model({"method": "tallrec", "llm": {"name": "tiny-llama"}, "injection": {}, "generator": {},
                            "cf_dim": 8})
    assert model.method.name == "tallrec" and model.generator is None


def test_collm_writes_the_mapped_cf_embeddings_into_its_two_slots_and_trains_only_the_mapping(tokenizer, yes_id):
    from cora.prompts import PromptEncoder, get_template
    enc = PromptEncoder(tokenizer, get_template("collm-movies"), max_history=3, max_length=256)
    assert get_method("collm").template + "movies" == "collm-movies"
    encoded = [enc.encode_with_slots(["A", "B"][:k], f"Target {k}") for k in range(3)]
    g = torch.Generator().manual_seed(0)
    user, item = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    batch = collate([ids for ids, _ in encoded], user, item, torch.ones(3), tokenizer.pad_token_id,
                    slots=[slots for _, slots in encoded])
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), method="collm")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mapper.") for n in trainable)
    inputs = model.method.inputs(model, batch)["inputs_embeds"]
    plain = model.llm.get_input_embeddings()(batch.input_ids)
    mapped = model.mapper(torch.stack([user, item], 1))
    for row, (_, (u, t)) in enumerate(encoded):
        assert torch.equal(inputs[row, u], mapped[row, 0]) and torch.equal(inputs[row, t], mapped[row, 1])
        others = [k for k in range(inputs.shape[1]) if k not in (u, t)]
        assert torch.equal(inputs[row, others], plain[row, others])      # every other token untouched
    loss, _ = model.loss(batch)
    loss.backward()
    assert all(p.grad is not None for p in model.mapper.parameters())
    assert all(p.grad is None for p in model.injection.parameters())  # the TALLRec stage's LoRA is frozen
    other = collate([ids for ids, _ in encoded], -user, item, torch.ones(3), tokenizer.pad_token_id,
                    slots=[slots for _, slots in encoded])
    with torch.no_grad():
        assert not torch.equal(model(batch), model(other))              # the score reads the CF input
    with pytest.raises(ValueError, match="encode with a collm-<domain> template"):
        model(_batch(tokenizer, 3))


def test_collm_loads_its_first_stage_lora_frozen_and_its_export_rebuilds_it_alone(tmp_path, tokenizer):
    """collm.lora_from: the TALLRec export's LoRA A and P are loaded into CoLLM's injection and frozen; CoLLM's
    export carries them with the mapping, so it rebuilds the scoring model without the first stage's files."""
    import shutil

    from cora.export import load_exported
    from cora.methods import make_method
    from cora.prompts import PromptEncoder, get_template
    from trainer.evaluate import export_trainable

    from ..conftest import write_tallrec_export
    lora = write_tallrec_export(tmp_path / "tallrec")
    cfg = {"method": "collm", "collm": {"lora_from": str(tmp_path / "tallrec")}, "llm": {"name": "tiny-llama"},
           "injection": {}, "generator": {}, "cf_dim": 8}
    model, _ = build_model(cfg)
    params = dict(model.named_parameters())
    assert lora and all(torch.equal(params[n], t) and not params[n].requires_grad for n, t in lora.items())
    exported = model.method.exported(model)
    assert set(exported) == set(lora) | {n for n in params if n.startswith("mapper.")}
    with torch.no_grad():
        for p in model.mapper.parameters():
            p.add_(0.1)
    enc = PromptEncoder(tokenizer, get_template("collm-movies"), max_history=3, max_length=256)
    encoded = [enc.encode_with_slots(["A", "B"][:k], f"Target {k}") for k in range(3)]
    g = torch.Generator().manual_seed(3)
    batch = collate([e[0] for e in encoded], torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g),
                    None, tokenizer.pad_token_id, slots=[e[1] for e in encoded])
    section = make_method(cfg).section()
    assert section == {"mid_times": 10, "lora_from": None}
    export_trainable({n: p.detach().clone() for n, p in exported.items()}, tmp_path / "collm",
                     dict(cfg, collm=section))
    shutil.rmtree(tmp_path / "tallrec")                       # the export alone is enough
    again, _ = load_exported(tmp_path / "collm")
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), again(batch))
        without = build_model(dict(cfg, collm={}))[0].eval()   # no first stage: P = 0, the LoRA does nothing
        without.mapper.load_state_dict(model.mapper.state_dict())
        assert not torch.equal(without(batch), again(batch))


def test_a_first_stage_that_does_not_fit_is_refused_with_what_differs(tmp_path):
    from cora.methods import read_lora

    from ..conftest import write_tallrec_export
    with pytest.raises(ValueError, match=r"lacks config.json, adapter.safetensors: point it at the export"):
        read_lora(tmp_path / "nothing", InjectionConfig())
    write_tallrec_export(tmp_path / "r8", rank=8, alpha=16)
    with pytest.raises(ValueError, match=r"injection.rank 8 \(this run: 16\); injection.alpha 16 \(this run: 32.0\)"):
        read_lora(tmp_path / "r8", InjectionConfig())
    with pytest.raises(ValueError, match=r"llm.name 'tiny-llama' \(this run: 'tiny-qwen2'\)"):
        read_lora(tmp_path / "r8", InjectionConfig(rank=8, alpha=16), "tiny-qwen2")
    assert read_lora(tmp_path / "r8", InjectionConfig(rank=8, alpha=16), "tiny-llama")
    cora_export = {"method": "cora", "llm": {"name": "tiny-llama"}, "injection": {}, "generator": {}, "cf_dim": 8}
    (tmp_path / "cora").mkdir()
    (tmp_path / "cora" / "config.json").write_text(__import__("json").dumps(cora_export))
    (tmp_path / "cora" / "adapter.safetensors").write_bytes((tmp_path / "r8" / "adapter.safetensors").read_bytes())
    with pytest.raises(ValueError, match="is an export of method 'cora'; it must be a LoRA trained by a method=tallrec run"):
        read_lora(tmp_path / "cora", InjectionConfig())
    with pytest.raises(ConfigError, match="collm.lora_from='x' is set but method='cora'"):
        from_dict(TrainConfig, {"collm": {"lora_from": "x"}})
    assert from_dict(TrainConfig, {"method": "collm", "collm": {"lora_from": "x"}}).collm.lora_from == "x"


def _cocktail(tmp_path, form, logits, entropy="answer"):
    from ..conftest import write_tallrec_export
    base = write_tallrec_export(tmp_path / "base", seed=1)
    ingredient = write_tallrec_export(tmp_path / "ingredient", seed=2)
    cfg = {"method": "reccocktail", "llm": {"name": "tiny-llama"}, "injection": {"dropout": 0.0}, "generator": {},
           "cf_dim": 8, "reccocktail": {"form": form, "entropy": entropy, "base_from": str(tmp_path / "base"),
                                        "ingredient_from": str(tmp_path / "ingredient")}}
    model, _ = build_model(cfg)
    with torch.no_grad():
        model.merger.logits.copy_(torch.as_tensor(logits, dtype=torch.float32).expand_as(model.merger.logits))
    return model.eval(), base, ingredient


@pytest.mark.parametrize("form", ["paper", "code"])
def test_reccocktail_scores_like_the_llm_with_the_merged_weights_written_in(form, tmp_path, tokenizer):
    """Both published merge forms against a direct computation: the frozen LLM with W + delta written into each
    injected module, delta = scale (l1 P_g + l2 P_s)(l1 A_g + l2 A_s) (paper: one global pair) or
    scale (l1 P_g A_g + l2 P_s A_s) (the authors' code: one pair per module), l = softmax(w)."""
    import copy
    model, base, ingredient = _cocktail(tmp_path, form, [0.7, -0.4])
    if form == "code":                                         # a different pair per module
        with torch.no_grad():
            model.merger.logits.copy_(torch.randn(model.merger.logits.shape, generator=torch.Generator().manual_seed(4)))
    assert model.merger.logits.shape == ((1, 2) if form == "paper" else (len(model.injection.modules), 2))
    batch = _batch(tokenizer)
    with torch.no_grad():
        got = model(batch)
        merged = copy.deepcopy(model.llm)
        mix = torch.softmax(model.merger.logits, -1)
        scale = model.injection.cfg.scale
        names = {id(m): n for n, m in model.llm.named_modules()}
        for m in model.injection.modules:
            name = "llm." + names[id(m)]
            ag, pg = base[name + ".lora_A"], base[name + ".lora_P"]
            a_s, p_s = ingredient[name + ".lora_A"], ingredient[name + ".lora_P"]
            l1, l2 = mix[0 if form == "paper" else m.merge_index]
            delta = (scale * (l1 * pg + l2 * p_s) @ (l1 * ag + l2 * a_s) if form == "paper"
                     else scale * (l1 * pg @ ag + l2 * p_s @ a_s))
            assert torch.allclose(m.variant.delta(m), delta, atol=1e-6)
            merged.get_submodule(names[id(m)]).base.weight.add_(delta)
        for m in model.injection.modules:                       # the plain LLM with the merged weights
            path, _, attr = names[id(m)].rpartition(".")
            setattr(merged.get_submodule(path), attr, merged.get_submodule(names[id(m)]).base)
        hidden = merged.base_model(batch.input_ids).last_hidden_state
        want = hidden[torch.arange(4), batch.lengths - 1] @ model.answer_w
    assert torch.allclose(got, want, atol=1e-4), (got, want)


@pytest.mark.parametrize("entropy", ["answer", "vocabulary"])
def test_reccocktail_trains_only_its_merge_weights_on_the_answer_tokens_entropy_without_labels(entropy, tmp_path,
                                                                                                 tokenizer):
    """The loss reads no label: with entropy=answer the entropy of Bernoulli(sigmoid(yes logit)), with
    entropy=vocabulary that of the LLM's whole next-token distribution, each against a direct computation."""
    from cora.methods import answer_entropy, yes_no_entropy
    model, base, _ = _cocktail(tmp_path, "paper", [0.0, 0.0], entropy)
    model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["merger.logits"]
    assert set(model.method.exported(model)) == set(base) | {"merger.logits"}
    batch = _batch(tokenizer)
    batch.labels = None                                         # the merge reads no label
    loss, logits = model.loss(batch)
    with torch.no_grad():                                       # the entropy of the LLM's own next-token distribution
        full = model.llm(batch.input_ids).logits[torch.arange(4), batch.lengths - 1]
        assert torch.allclose(logits, full[:, _yes(model)], atol=1e-4)
        yes = torch.sigmoid(logits)
        p = torch.softmax(full, -1) if entropy == "vocabulary" else torch.stack([yes, 1 - yes], -1)
        assert torch.allclose(loss, -(p * p.log()).sum(-1).mean(), atol=1e-5)
    loss.backward()
    assert model.merger.logits.grad is not None and model.merger.logits.grad.abs().sum() > 0
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0])                # weight-0 padding counts for nothing
    v = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(answer_entropy(v, weights), answer_entropy(v[[0, 2]]))
    s = torch.tensor([-40.0, -2.0, 0.0, 3.0, 40.0])              # stable at saturated logits, log 2 at 0
    assert torch.isfinite(yes_no_entropy(s)) and torch.allclose(yes_no_entropy(s[2:3]), torch.tensor(math.log(2)))
    assert torch.allclose(yes_no_entropy(s[[1, 3]], torch.tensor([1.0, 0.0])), yes_no_entropy(s[1:2]))
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"method": "reccocktail", "reccocktail": {"base_from": "b"}})
    assert "method=reccocktail needs reccocktail.ingredient_from" in str(err.value)
    with pytest.raises(ConfigError, match="reccocktail.base_from/ingredient_from are set but method='tallrec'"):
        from_dict(TrainConfig, {"method": "tallrec", "reccocktail": {"base_from": "b"}})


def _yes(model):
    head = model.llm.get_output_embeddings().weight
    return int((head == model.answer_w).all(-1).nonzero()[0])


class LocalStore:
    """BDLM's store in this process (cluster.store.StoreClient's interface over one cora.bdlm.StoreShard per table)."""

    def __init__(self, user, item, lr=1.0, optimizer="sgd"):
        from cora.bdlm import StoreShard
        self.shards = {k: StoreShard(k, 0, len(t), t, t * 0.5, 1, lr, optimizer)
                       for k, t in (("user", user), ("item", item))}
        self.dim, self.sizes = user.shape[1], {"user": len(user), "item": len(item)}

    def read(self, key, ids, after=0):
        assert self.shards[key].version >= after
        return self.shards[key].read(ids)[:2]

    def push(self, step, rank, grads, records=None):
        for k, (ids, g) in grads.items():
            self.shards[k].push(step, rank, ids, g, records if k == "user" else None)

    def reset(self):
        pass

    def tables(self, after=0):
        return {k: s.table.copy() for k, s in self.shards.items()}


def test_bdlm_feeds_the_store_rows_into_its_slots_and_sends_their_gradients_back_to_the_store(tokenizer, yes_id):
    """BDLM's LLM side in one process: the slots get proj(E[u]) and proj(E[i]); after backward and the step, the
    store's rows of the batch's users and items (and only those, and not those of a padding sample) moved by
    exactly -lr x dL/dE (SGD, lr 1, one rank) where dL/dE is computed directly by autograd on a copy of E; the
    loss adds mutual_weight x BCE towards the domain model's <T_u, T_i>; the LLM gets no gradient and stays
    bit-identical."""
    import numpy as np

    from cora.bdlm import BDLMConfig
    from cora.methods import BDLM
    from cora.prompts import PromptEncoder, get_template
    from cora.scoring import bce_loss
    enc = PromptEncoder(tokenizer, get_template("collm-movies"), max_history=3, max_length=256)
    encoded = [enc.encode_with_slots(["A", "B"][:k % 3], f"Target {k}") for k in range(4)]
    rng = np.random.default_rng(0)
    user, item = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    store = LocalStore(user, item)
    method = BDLM(BDLMConfig(mutual_weight=0.5))
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(), method=method)
    frozen = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"bdlm_proj.weight", "bdlm_proj.bias"}
    method.connect(model, store, 0, 1, {})
    batch = collate([e[0] for e in encoded], torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor([1., 0., 1., 1.]),
                    tokenizer.pad_token_id, weights=torch.tensor([1., 1., 1., 0.]), slots=[e[1] for e in encoded])
    batch.users, batch.items = torch.tensor([1, 3, 1, 4]), torch.tensor([2, 2, 5, 0])   # user 4, item 0: padding only
    # the direct computation: E as parameters, the same forward
    E_u, E_i = (torch.tensor(t, requires_grad=True) for t in (user, item))
    u, i = E_u[batch.users], E_i[batch.items]
    embeds = model.llm.get_input_embeddings()(batch.input_ids)
    mapped = model.bdlm_proj(torch.stack([u, i], 1))
    index = batch.slots.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    h = model.backbone(inputs_embeds=embeds.scatter(1, index, mapped)).last_hidden_state
    logit = model.yes_logit(h[torch.arange(4), batch.lengths - 1]).float()
    teacher = (torch.tensor(user * 0.5)[batch.users] * torch.tensor(item * 0.5)[batch.items]).sum(-1)
    want = bce_loss(logit, batch.labels, batch.weights) + 0.5 * bce_loss(logit, torch.sigmoid(teacher), batch.weights)
    g_u, g_i = torch.autograd.grad(want, [E_u, E_i])
    # BDLM's own step
    model.train()
    loss, scores = model.loss(batch)
    assert torch.allclose(loss, want, atol=1e-6) and torch.allclose(scores, logit, atol=1e-6)
    loss.backward()
    method.after_backward(model, batch)
    method.after_step(model, 1)
    assert store.shards["user"].version == 1
    np.testing.assert_allclose(store.shards["user"].table, user - g_u.numpy(), atol=1e-6)
    np.testing.assert_allclose(store.shards["item"].table, item - g_i.numpy(), atol=1e-6)
    assert (g_u[[1, 3]].abs().sum(-1) > 0).all() and (g_i[[2, 5]].abs().sum(-1) > 0).all()
    np.testing.assert_array_equal(store.shards["user"].table[[0, 2, 4]], user[[0, 2, 4]])   # not read, or padding
    np.testing.assert_array_equal(store.shards["item"].table[[0, 1, 3, 4]], item[[0, 1, 3, 4]])
    users_rec, items_rec, _ = store.shards["user"].recorded()
    assert sorted(zip(users_rec.tolist(), items_rec.tolist())) == [(1, 2), (1, 5), (3, 2)]   # the LLM's real scores
    assert all(p.grad is not None for p in model.bdlm_proj.parameters())
    assert all(p.grad is None and torch.equal(p, frozen[n]) for n, p in model.llm.named_parameters())
    with pytest.raises(ValueError, match="encode with a collm-<domain> template"):
        model(_batch(tokenizer, 3))


def test_bdlm_export_holds_the_projection_and_the_store_tables_and_rebuilds_the_llm_model_alone(tmp_path, tokenizer,
                                                                                                yes_id):
    import numpy as np

    from cora.export import load_exported
    from cora.methods import make_method
    from cora.prompts import PromptEncoder, get_template
    from trainer.evaluate import export_trainable
    rng = np.random.default_rng(1)
    user, item = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    cfg = {"method": "bdlm", "llm": {"name": "tiny-llama"}, "injection": {}, "generator": {}, "cf_dim": 8}
    model, _ = build_model(cfg)
    model.method.connect(model, LocalStore(user, item), 0, 1, {})
    exported = model.method.exported(model)
    assert set(exported) == {"bdlm_proj.weight", "bdlm_proj.bias", "store_user", "store_item"}
    np.testing.assert_array_equal(exported["store_user"].numpy(), user)
    section = model.method.section()
    assert section["num_users"] == 5 and section["num_items"] == 6
    export_trainable({n: p.detach().clone() for n, p in exported.items()}, tmp_path / "bdlm", dict(cfg, bdlm=section))
    again, _ = load_exported(tmp_path / "bdlm")
    assert again.method.store is None and make_method(dict(cfg, bdlm=section)).num_items == 6
    enc = PromptEncoder(tokenizer, get_template("collm-movies"), max_history=3, max_length=256)
    encoded = [enc.encode_with_slots(["A"], f"Target {k}") for k in range(3)]
    batch = collate([e[0] for e in encoded], torch.zeros(3, 8), torch.zeros(3, 8), None, tokenizer.pad_token_id,
                    slots=[e[1] for e in encoded])
    batch.users, batch.items = torch.tensor([0, 4, 2]), torch.tensor([5, 1, 1])
    with torch.no_grad():
        assert torch.allclose(model.eval()(batch), again(batch), atol=1e-6)
