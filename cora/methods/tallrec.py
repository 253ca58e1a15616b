"""TALLRec: ordinary LoRA (a learned A and P per injected module) on the same prompt, no CF input; the
``Method`` defaults are exactly it."""

from __future__ import annotations

from .base import Method


class TALLRec(Method):
    name, uses_cf, adapter = "tallrec", False, "lora"
