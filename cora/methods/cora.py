"""CoRA (the paper): per-sample LoRA A from the collaborative weights generator, P trained."""

from __future__ import annotations

from ..generator import CollaborativeWeightsGenerator, GeneratorConfig
from .base import Method


class CoRA(Method):
    name, uses_cf, adapter = "cora", True, "cora"

    def attach(self, model, injection, generator, user_dim, item_dim):
        super().attach(model, injection, generator, user_dim, item_dim)
        inj = model.injection
        model.generator = CollaborativeWeightsGenerator(generator or GeneratorConfig(), user_dim, item_dim,
                                                        inj.widths, injection.rank, inj.num_layers,
                                                        injection.per_layer)

    def trainable(self, model):
        return super().trainable(model) + list(model.generator.parameters())

    def inputs(self, model, batch):
        model.injection.set_weights(model.generator.weights(batch.user_emb, batch.item_emb))
        return super().inputs(model, batch)
