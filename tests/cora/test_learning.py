"""The LLM perceives collaborative information through its weights, and only through them."""

import numpy as np
import pytest
import torch

from cora.injection import InjectionConfig
from cora.local import Samples, fit, predict
from cora.metrics import auc
from cora.optim import OptimConfig
from cora.prompts import PromptEncoder, get_template
from cora.scoring import CoRAModel
from cora.synthetic import planted

from .conftest import tiny

GEN = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, dropout=0.0)


def _train_auc(adapter: str, tokenizer, yes_id) -> tuple[float, list[float]]:
    from cora.generator import GeneratorConfig
    torch.manual_seed(0)
    d = planted(n_users=64, n_items=64, n_samples=256, dim=8, history_len=3, text_pool=4,
                rule="additive", seed=0)
    enc = PromptEncoder(tokenizer, get_template("movies"), max_history=3, max_length=128)
    prompts = [enc.encode(h, t) for h, t in zip(d.histories, d.targets)]
    assert len({tuple(p) for p in prompts}) == 4          # the text cannot single out a sample
    data = Samples(prompts, d.user_factors[d.users], d.item_factors[d.items], d.labels, d.users)
    model = CoRAModel(tiny(), yes_id, 8, 8, InjectionConfig(adapter=adapter), GeneratorConfig(**GEN))
    losses = fit(model, data, epochs=30, batch_size=16, pad_id=tokenizer.pad_token_id,
                 optim=OptimConfig(lr_peak=1e-3, lr_end=1e-4, warmup_steps=10))
    return auc(d.labels, predict(model, data, batch_size=64, pad_id=tokenizer.pad_token_id)), losses


@pytest.mark.slow
def test_injection_learns_cf_signal_that_text_alone_cannot(tokenizer, yes_id):
    cora_auc, losses = _train_auc("cora", tokenizer, yes_id)
    lora_auc, _ = _train_auc("lora", tokenizer, yes_id)
    assert np.isfinite(losses).all() and np.mean(losses[-16:]) < np.mean(losses[:16])
    assert cora_auc >= 0.95, cora_auc
    assert lora_auc <= 0.6, lora_auc
