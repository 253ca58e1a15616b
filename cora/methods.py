"""The recommendation methods that share one frozen LLM, one prompt format, the trainer and the eval: a
strategy object per method (as peft has one class per adapter type), so that the trainer, the data
actors, checkpoints, resume and evaluation never branch on the method.

A method says:

- ``attach``: what it adds to the frozen LLM inside ``CoRAModel`` (an injection, a generator, ...);
- ``trainable``: which of those parameters train;
- ``inputs``: how a ``Batch`` becomes the backbone's inputs (CoRA also installs this batch's A here);
- ``name``: what exports and checkpoints record (``"method"``) so that the model can be rebuilt.

Every method is scored the same way (the raw "Yes" logit at the answer position, ``CoRAModel.forward``).

    cora     per-sample A from the collaborative weights generator (CF user + item embeddings), P trained
    tallrec  ordinary LoRA (a learned A and P per module) on the same prompt: no CF input (TALLRec)

The no-injection baseline is not a method: it is any method's model before training (P = 0), which
``cora train`` scores once as ``no_injection_test``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from torch import nn

from .generator import CollaborativeWeightsGenerator, GeneratorConfig
from .injection import Injection, InjectionConfig


class Method:
    """Base strategy; subclasses set ``name``, ``uses_cf`` and ``adapter`` and override what differs."""

    name: ClassVar[str] = ""
    uses_cf: ClassVar[bool] = False
    """Whether the scores depend on the CF embeddings of the batch."""
    adapter: ClassVar[str] = "cora"
    """The injection variant (``InjectionConfig.adapter``) the method uses."""

    def attach(self, model: nn.Module, injection: InjectionConfig, generator: GeneratorConfig | None,
               user_dim: int, item_dim: int) -> None:
        """Add the method's modules to ``model`` (whose ``llm`` is frozen)."""
        model.injection = Injection(model.llm, replace(injection, adapter=self.adapter))
        model.generator = None

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.injection.parameters())

    def inputs(self, model: nn.Module, batch) -> dict:
        """The backbone's keyword inputs for ``batch``."""
        return {"input_ids": batch.input_ids}


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


class TALLRec(Method):
    name, uses_cf, adapter = "tallrec", False, "lora"


METHODS: dict[str, type[Method]] = {m.name: m for m in (CoRA, TALLRec)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()


def method_of(config: dict) -> str:
    """The method a saved model config names (exports and checkpoints from before methods existed name
    none: their ``injection.adapter`` says it, 'lora' being TALLRec)."""
    if config.get("method"):
        return config["method"]
    return "tallrec" if config.get("injection", {}).get("adapter") == "lora" else "cora"
