"""The recommendation methods that share one frozen LLM, one prompt format, the trainer and the eval: a
strategy object per method (as peft has one class per adapter type), so that the trainer, the data
actors, checkpoints, resume and evaluation never branch on the method. The interface is ``base.Method``; each
method is a module of this package, named as the method (``make_method`` builds one from a saved config):

    cora     per-sample A from the collaborative weights generator (CF user + item embeddings), P trained
    tallrec  ordinary LoRA (a learned A and P per module) on the same prompt: no CF input (TALLRec)
    collm    CF embeddings mapped into two token slots of CoLLM's prompt; the mapping trains, the LoRA of
             its TALLRec stage (a tallrec run's export, ``collm.lora_from``) is loaded and frozen
    reccocktail  two TALLRec LoRAs (source domains' "base spirit", target's "ingredient") frozen and mixed;
             the merge weights train on unlabeled target prompts (answer-token entropy)
    laser    an M-Former prefix over the history's CF item embeddings and a suffix token; scored by the cosine
             between the user's and the item's encodings
    bdlm     user and item ID slots whose embeddings come from a store shared with a domain model (LightGCN):
             proj(E[u]), proj(E[i]); proj trains, the rows read are updated in the store; the domain model
             trains on the same store between epochs, each model learning from the other's scores (cora.bdlm)

The no-injection baseline is not a method: it is any method's model before training (P = 0), which
``cora train`` scores once as ``no_injection_test``.
"""

from __future__ import annotations

from ..bdlm import BDLMConfig
from .base import Method, answer_entropy, method_of, weighted_mean, yes_no_entropy
from .bdlm import BDLM
from .collm import CoLLM, CoLLMConfig, read_lora
from .cora import CoRA
from .laser import Laser, LaserConfig
from .reccocktail import RecCocktail, RecCocktailConfig
from .tallrec import TALLRec

__all__ = ["Method", "METHODS", "get_method", "make_method", "method_of", "read_lora", "weighted_mean",
           "yes_no_entropy", "answer_entropy", "CoRA", "TALLRec", "CoLLM", "CoLLMConfig", "RecCocktail",
           "RecCocktailConfig", "Laser", "LaserConfig", "BDLM", "BDLMConfig"]

METHODS: dict[str, type[Method]] = {m.name: m for m in (CoRA, TALLRec, CoLLM, RecCocktail, Laser, BDLM)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]()


def make_method(config: dict, num_items: int | None = None) -> Method:
    """The strategy a config names (a TrainConfig as a dict, an export's or a checkpoint's saved config),
    with its own section (``collm``, ``reccocktail``, ``laser``, ``bdlm``) when it has one; ``num_items``: the item
    table's size for Laser (an export's section records it)."""
    name = method_of(config)
    if name == "laser":
        section = dict(config.get("laser") or {})
        saved = section.pop("num_items", None)
        return Laser(LaserConfig(**section), num_items if num_items is not None else saved or config.get("num_items", 0))
    if name == "collm":
        return CoLLM(CoLLMConfig(**(config.get("collm") or {})))
    if name == "bdlm":
        section = dict(config.get("bdlm") or {})
        users, items = section.pop("num_users", 0), section.pop("num_items", 0)
        return BDLM(BDLMConfig(**section), users, items)
    if name == "reccocktail":
        return RecCocktail(RecCocktailConfig(**(config.get("reccocktail") or {})))
    return get_method(name)
