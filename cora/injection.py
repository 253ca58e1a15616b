"""Per-sample low-rank weight injection into a frozen LLM's linear layers.

For every target linear layer ``W`` (q/k/v/o by default) and every sample ``b`` of a batch::

    y_b = W x_b + (alpha / r) * P (dropout(x_b) @ A_b)

    x_b: (T, d_in)   A_b: (d_in, r), generated per sample   P: (d_out, r), per layer and module,
    zero-initialised and trained.

The update is computed on activations with batched matmuls (``bmm`` for the per-sample down
projection, one ``addmm`` that accumulates ``z P^T`` straight into the base output); no per-sample
weight ``W + delta`` is ever materialised (``merge`` does that, for export and tests only).

Because q, k and v read the same hidden state and share ``A_b``, their down projection
``dropout(x) @ A_b`` is computed once per layer and reused (see ``SharedDown``): the per-sample path
costs one ``(B, T, d) @ (B, d, r)`` per layer for all three, where ordinary LoRA pays one per module.
Each module keeps its own ``P`` parameter (rather than one fused ``P_qkv``) so that under DeepSpeed
ZeRO-3 each parameter is owned by the module whose forward uses it and is gathered by ZeRO's hooks.

Sizes are read from the layer's ``in_features``/``out_features`` (``nx``/``nf`` for GPT-2's Conv1D),
never from ``weight.shape``, which is empty when ZeRO-3 has partitioned the weight.

How ``A`` is obtained is a strategy (``Variant``): ``PerSampleVariant`` is CoRA (``A_b`` set for each
batch by the generator); ``SharedVariant`` is ordinary LoRA with a learned ``A`` per module (the
TALLRec-style baseline without collaborative information).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_LLAMA_PATHS = {**{t: f"self_attn.{t}" for t in ATTENTION_TARGETS}, **{t: f"mlp.{t}" for t in MLP_TARGETS}}
# Where each logical target lives inside one decoder layer, per model family. GPT-2 fuses q, k, v
# into one Conv1D (c_attn) and has no gate projection.
MODULE_PATHS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_PATHS, "mistral": _LLAMA_PATHS, "qwen2": _LLAMA_PATHS,
    "gpt2": {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn",
             "o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"},
}
# Targets that read the same input tensor inside a decoder layer.
SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass
class InjectionConfig:
    """Where and how the low-rank update is injected."""

    rank: int = 16
    """r: the rank of the update (the paper: 16 for MF, 64 for LightGCN/SASRec on ML-1M)."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the layer input of the low-rank path (shared by q, k and v)."""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Logical module names to inject into, in every decoder layer."""
    per_layer: bool = False
    """One generated A per decoder layer instead of one A shared by all layers (the paper's default)."""
    adapter: Literal["cora", "lora"] = "cora"
    """'cora': per-sample A from the generator; 'lora': a learned A per module (no CF input). Set by the
    method (cora.methods: CoRA uses 'cora', TALLRec 'lora'); a config need not write it."""

    def validate(self) -> list[str]:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        known = ATTENTION_TARGETS + MLP_TARGETS
        bad = [t for t in self.targets if t not in known]
        if bad:
            problems.append(f"unknown target modules {bad}; accepted: {', '.join(known)}")
        if not self.targets:
            problems.append(f"targets is empty; choose from {', '.join(known)}")
        return problems

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def layer_widths(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D, without reading the (maybe partitioned) weight."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    raise TypeError(f"cannot inject into {type(module).__name__}; only nn.Linear and Conv1D are supported")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or Conv1D (Conv1D stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def drop_positions(n: int, p: float, chunk: int | None = None) -> torch.Tensor:
    """The sorted positions of the failures among ``n`` independent Bernoulli trials that each fail with
    probability ``p``: the gaps between failures are geometric (P(g kept before the next drop) = (1-p)^g p),
    drawn by inversion, ``floor(log(1 - u) / log(1 - p))``, from float64 uniforms of torch's CPU generator
    (seeded by ``torch.manual_seed``). ``chunk`` uniforms are drawn at a time (default n p + 8 sqrt(n p) + 16,
    almost always enough: ~n p draws, not one per trial), again from where they stopped until they pass ``n``."""
    mean = n * p
    chunk = chunk or int(mean + 8 * math.sqrt(mean) + 16)
    log_keep = math.log1p(-p)
    out, start = [], 0
    while True:
        u = torch.empty(chunk, dtype=torch.float64).uniform_()
        gaps = torch.log1p(u.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1)
        pos = gaps.cumsum_(0).add_(start - 1)
        if pos[-1] >= n:
            out.append(pos[:int(torch.searchsorted(pos, n))])
            return out[0] if len(out) == 1 else torch.cat(out)
        out.append(pos)
        start = int(pos[-1]) + 1


def adapter_dropout(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """Dropout for the low-rank path's input: returns ``(x * keep, factor)``; the caller folds
    ``factor = 1 / (1 - p)`` into the small matrix A instead of rescaling the large activation.

    On CUDA this is ``F.dropout`` (a fused kernel). On the CPU, ``F.dropout`` spends most of its time
    drawing one Bernoulli sample per element (about 30x the cost of the rank-16 ``bmm`` it feeds), so only
    the dropped elements are drawn: their positions (``drop_positions``: ~p n draws) are zeroed in a copy
    of ``x`` (``index_fill``; its backward zeroes the same positions of the gradient). Every element is
    still dropped independently with probability exactly ``p``. Seeded by ``torch.manual_seed``, so
    activation-checkpoint recomputation (which restores the generator) drops the same elements.
    """
    if not training or p == 0.0:
        return x, 1.0
    if x.device.type != "cpu":
        return F.dropout(x, p, True), 1.0
    dropped = drop_positions(x.numel(), p)
    return x.reshape(-1).index_fill(0, dropped, 0.0).view(x.shape), 1.0 / (1.0 - p)


class SharedDown:
    """The down projection ``dropout(x) @ A`` of the modules of one decoder layer that read the same input
    (q/k/v under ``self_attn``; gate/up under ``mlp``), computed once per forward of their parent module.

    Sharing is structural, not by tensor identity: DeepSpeed ZeRO-3's pre-forward hooks hand every module
    a new tensor object for the same hidden state, so an identity cache never hits under ZeRO-3. Instead a
    forward pre-hook on the parent opens a window, the first member called inside it computes ``z`` and
    the others reuse it (one dropout mask for q, k and v, as in one process), and the parent's forward
    hook drops it: nothing stays referenced after the layer (the autograd graph keeps what backward needs).
    Activation-checkpoint recomputation re-runs the parent's forward, so it reopens the window.
    ``computed`` counts the down projections run (for tests and benchmarks).
    """

    def __init__(self, parent: nn.Module):
        self.members = 0
        self.z: torch.Tensor | None = None
        self.computed = 0
        self._open = False
        parent.register_forward_pre_hook(self._enter)
        parent.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        self.z, self._open = None, True

    def _leave(self, module, args, output) -> None:
        self.release()

    def release(self) -> None:
        """Drop the window (also for a recomputation that non-reentrant activation checkpointing stopped
        early, before the parent's forward returned: ``Injection.release`` after backward)."""
        self.z, self._open = None, False

    def get(self, x: torch.Tensor, compute) -> torch.Tensor:
        """``compute(x)`` once per window (a member called outside its parent's forward computes alone)."""
        z = self.z
        if z is None or z.shape[:-1] != x.shape[:-1]:
            z = compute(x)
            self.computed += 1
            self.z = z if self._open and self.members > 1 else None
        return z


class Variant:
    """Strategy that provides the down projection ``dropout(x) @ A`` for an injected layer."""

    def setup(self, layer: "InjectedLinear") -> None:
        """Create any parameters the variant needs on the layer."""

    def down(self, layer: "InjectedLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def up(self, layer: "InjectedLinear") -> torch.Tensor:
        """The (d_out, k) up projection the down projection's k outputs go through: P."""
        return layer.lora_P

    def effective_a(self, layer: "InjectedLinear", sample: int) -> torch.Tensor:
        """The (d_in, r) matrix A (scale included) used for one sample; for merge()."""
        raise NotImplementedError


class PerSampleVariant(Variant):
    """CoRA: A_b generated per sample, set once per batch with ``set_weights``."""

    def __init__(self, scale: float, per_layer: bool):
        self.scale = scale
        self.per_layer = per_layer
        self.weights: dict[int, torch.Tensor] = {}

    def set_weights(self, weights: dict[int, torch.Tensor], widths: set[int], num_layers: int) -> None:
        """weights: d_in -> (B, d_in, r), or (B, L, d_in, r) when per_layer. Kept until replaced, so
        that activation-checkpoint recomputation during backward still sees the batch's A."""
        missing = sorted(widths - set(weights))
        if missing:
            raise ValueError(f"adapter weights missing for input widths {missing}; got {sorted(weights)}")
        batch = {w.shape[0] for w in weights.values()}
        if len(batch) != 1:
            raise ValueError(f"adapter weights disagree on the batch size: {sorted(batch)}")
        for d_in, a in weights.items():
            want = 4 if self.per_layer else 3
            if a.dim() != want or a.shape[-2] != d_in or (self.per_layer and a.shape[1] != num_layers):
                raise ValueError(f"adapter weights for width {d_in} have shape {tuple(a.shape)}; expected "
                                 f"(B, {str(num_layers) + ', ' if self.per_layer else ''}{d_in}, r)")
        self.weights = {d: a * self.scale for d, a in weights.items()}

    def _a(self, layer: "InjectedLinear") -> torch.Tensor:
        if not self.weights:
            raise RuntimeError("no per-sample adapter weights set: call set_weights() before the forward")
        a = self.weights[layer.in_features]
        return a[:, layer.layer_index] if self.per_layer else a

    def down(self, layer, x):
        a = self._a(layer)  # (B, d_in, r)
        if x.shape[0] != a.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} inputs but adapter weights for {a.shape[0]} samples")

        def compute(x):
            h, factor = adapter_dropout(x, layer.dropout, layer.training)
            a_f = a.to(x.dtype) if factor == 1.0 else (a * factor).to(x.dtype)
            return torch.bmm(h.reshape(x.shape[0], -1, x.shape[-1]), a_f)  # (B,T,d)->(B,T,r)

        return layer.shared.get(x, compute).view(*x.shape[:-1], -1)

    def effective_a(self, layer, sample):
        return self._a(layer)[sample]


class SharedVariant(Variant):
    """Ordinary LoRA: a learned A per module, the same for every sample (peft's initialisation)."""

    def __init__(self, scale: float):
        self.scale = scale

    def setup(self, layer):
        layer.lora_A = nn.Parameter(torch.empty(layer.rank, layer.in_features))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))

    def down(self, layer, x):
        h, factor = adapter_dropout(x, layer.dropout, layer.training)
        # .to: under ZeRO-3 with bf16 the LLM is bf16 and A stays fp32 (DeepSpeed casts no parameter of a
        # model built under zero.Init, and the adapters are added after it), as CoRA's generated A does
        return F.linear(h, (layer.lora_A * (self.scale * factor)).to(h.dtype))

    def effective_a(self, layer, sample):
        return layer.lora_A.t() * self.scale


class MergeVariant(Variant):
    """Two frozen LoRAs per module (RecCocktail's general "base spirit" g and domain "ingredient" s), mixed by
    weights l = softmax(w) set once per forward (``set_mix``: (1, 2) for one global pair, (M, 2) for one pair
    per injected module, in ``Injection.modules`` order):

        form "paper": A_m = l1 A_g + l2 A_s, P_m = l1 P_g + l2 P_s    update P_m A_m (rank r)
        form "code":  l1 P_g A_g + l2 P_s A_s                           (as one rank-2r update [l1 P_g, l2 P_s] [A_g; A_s])

    ``lora_A`` (2, r, d_in) and ``lora_P`` (2, d_out, r) hold [g, s]; nothing of them trains."""

    def __init__(self, scale: float, form: str):
        if form not in ("paper", "code"):
            raise ValueError(f"unknown merge form {form!r}; use 'paper' (A and P mixed) or 'code' (updates mixed)")
        self.scale, self.form = scale, form
        self.count = 0
        self.mix: torch.Tensor | None = None

    def setup(self, layer):
        layer.lora_A = nn.Parameter(torch.zeros(2, layer.rank, layer.in_features), requires_grad=False)
        layer.lora_P = nn.Parameter(torch.zeros(2, layer.out_features, layer.rank), requires_grad=False)
        layer.merge_index = self.count
        self.count += 1

    def set_mix(self, mix: torch.Tensor) -> None:
        if mix.dim() != 2 or mix.shape[-1] != 2 or mix.shape[0] not in (1, self.count):
            raise ValueError(f"merge weights of shape {tuple(mix.shape)}; expected (1, 2) or ({self.count}, 2)")
        self.mix = mix

    def _l(self, layer) -> torch.Tensor:
        if self.mix is None:
            raise RuntimeError("no merge weights set: call set_mix() before the forward")
        return self.mix[0 if self.mix.shape[0] == 1 else layer.merge_index]

    def down(self, layer, x):
        h, factor = adapter_dropout(x, layer.dropout, layer.training)
        a = layer.lora_A.to(x.dtype)
        if self.form == "paper":
            l = self._l(layer).to(x.dtype)
            a = l[0] * a[0] + l[1] * a[1]                                    # (r, d_in)
        else:
            a = a.reshape(-1, layer.in_features)                             # (2r, d_in)
        return F.linear(h, a * (self.scale * factor))

    def up(self, layer):
        l, p = self._l(layer).to(layer.lora_P.dtype), layer.lora_P
        if self.form == "paper":
            return l[0] * p[0] + l[1] * p[1]                                 # (d_out, r)
        return torch.cat([l[0] * p[0], l[1] * p[1]], dim=1)                  # (d_out, 2r)

    def effective_a(self, layer, sample):
        raise NotImplementedError("InjectedLinear.merge() is not defined for mixed LoRAs; use MergeVariant.delta()")

    def delta(self, layer) -> torch.Tensor:
        """The (d_out, d_in) weight update of the mixed LoRAs (scale included); for tests and exports."""
        l = self._l(layer)
        a, p = layer.lora_A, layer.lora_P
        if self.form == "paper":
            return self.scale * (l[0] * p[0] + l[1] * p[1]) @ (l[0] * a[0] + l[1] * a[1])
        return self.scale * (l[0] * p[0] @ a[0] + l[1] * p[1] @ a[1])


class InjectedLinear(nn.Module):
    """A frozen Linear/Conv1D plus the low-rank path: ``y = W x + P (down(x))``, P: (d_out, r)."""

    def __init__(self, base: nn.Module, variant: Variant, rank: int, dropout: float,
                 layer_index: int, shared: SharedDown):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = layer_widths(base)
        self.rank, self.dropout, self.layer_index = rank, dropout, layer_index
        self.variant, self.shared = variant, shared
        shared.members += 1
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, rank))  # zero: step 0 == frozen LLM
        variant.setup(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                  # (..., d_out), ZeRO-3 gathers W here
        z = self.variant.down(self, x)                    # (..., k), scale folded in (k = r; 2r for merged LoRAs)
        p = self.variant.up(self).to(y.dtype)             # (d_out, k): P
        # y + z @ P^T as one GEMM accumulating into y: (N, d_out) + (N, k) @ (k, d_out)
        return torch.addmm(y.reshape(-1, self.out_features), z.reshape(-1, z.shape[-1]), p.t()).view_as(y)

    def merge(self, sample: int = 0) -> torch.Tensor:
        """W + scale * P A_b^T for one sample, shape (d_out, d_in); for export and tests."""
        a = self.variant.effective_a(self, sample)        # (d_in, r), scale included
        return dense_weight(self.base) + self.lora_P @ a.t().to(self.lora_P.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, layer={self.layer_index}"


def model_family(model: nn.Module) -> str:
    family = getattr(model.config, "model_type", None)
    if family not in MODULE_PATHS:
        raise ValueError(f"LLM architecture {family!r} is not supported for injection; "
                         f"supported: {', '.join(MODULE_PATHS)}")
    return family


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    backbone = model.base_model
    for name in ("layers", "h"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layer list (.layers or .h) found")


def check_targets(family: str, targets: list[str]) -> None:
    """Raise ValueError unless every logical target names a module of this model family."""
    paths = MODULE_PATHS[family]
    unsupported = [t for t in targets if t not in paths]
    if unsupported:
        raise ValueError(f"{family} has no modules for targets {unsupported}; "
                         f"available in {family}: {', '.join(paths)}")
    chosen = {paths[t] for t in targets}
    if family == "gpt2" and "attn.c_attn" in chosen and not {"q_proj", "k_proj", "v_proj"} <= set(targets):
        raise ValueError("GPT-2 fuses q, k and v in one layer (attn.c_attn): target all of "
                         "q_proj, k_proj, v_proj or none of them")


class Injection:
    """Handle on the injected modules of one LLM: the variant, the layers, the trainable P (and A)."""

    def __init__(self, model: nn.Module, cfg: InjectionConfig, variant: Variant | None = None):
        """``variant``: the down/up projections (default: by ``cfg.adapter``, per-sample or shared LoRA)."""
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid injection config: " + "; ".join(problems))
        self.cfg = cfg
        family = model_family(model)
        check_targets(family, cfg.targets)
        paths = MODULE_PATHS[family]
        chosen = {paths[t] for t in cfg.targets}
        self.variant = variant or (PerSampleVariant(cfg.scale, cfg.per_layer) if cfg.adapter == "cora"
                                   else SharedVariant(cfg.scale))
        self.layers = decoder_layers(model)
        self.modules: list[InjectedLinear] = []
        self.groups: list[SharedDown] = []
        for index, layer in enumerate(self.layers):
            groups: dict[tuple[str, str, int], SharedDown] = {}
            for path in sorted(chosen):
                parent_path, _, attr = path.rpartition(".")
                parent = layer.get_submodule(parent_path)
                base = getattr(parent, attr)
                d_in, _ = layer_widths(base)
                # modules that read the same x (q/k/v; gate/up: siblings under one parent) share one down projection
                target = next(t for t in cfg.targets if paths[t] == path)
                key = (parent_path, SAME_INPUT.get(target, target), d_in)
                if key not in groups:
                    groups[key] = SharedDown(parent)
                    self.groups.append(groups[key])
                shared = groups[key]
                wrapped = InjectedLinear(base, self.variant, cfg.rank, cfg.dropout, index, shared)
                setattr(parent, attr, wrapped)
                self.modules.append(wrapped)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> set[int]:
        """The distinct input widths of the injected modules: the generator makes one A per width."""
        return {m.in_features for m in self.modules}

    def set_weights(self, weights: dict[int, torch.Tensor]) -> None:
        """Install this batch's per-sample A matrices (CoRA only)."""
        if not isinstance(self.variant, PerSampleVariant):
            raise TypeError("set_weights is for the per-sample ('cora') adapter; this injection is 'lora'")
        self.variant.set_weights(weights, self.widths, self.num_layers)

    def release(self) -> None:
        """Drop every shared down projection still held (call after backward)."""
        for g in self.groups:
            g.release()

    def parameters(self):
        """The trainable parameters of the injection (P, and A for the 'lora' adapter)."""
        for m in self.modules:
            yield m.lora_P
            if hasattr(m, "lora_A"):
                yield m.lora_A
