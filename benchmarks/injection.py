"""One training step (forward + backward) of four ways to put a rank-r update into a frozen LLM.

    python benchmarks/injection.py --json

Side by side in one run, on a SmolLM2-135M-shaped Llama with random weights (hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, vocab 49152), batch 8, sequence 128, r=16 on q/k/v/o:

  frozen  the frozen LLM, gradients only w.r.t. its input embeddings (the floor)
  peft    peft LoRA, same rank, targets and dropout (one shared adapter)
  cora    CoRA: the paper's generator (Q-Former, 8 layers, hidden 512) + per-sample injection
  naive   per-sample merged weights: W_b = W + scale * P A_b^T materialised, then bmm

All four score the same way (the "Yes" logit at the last position, BCE loss), so the ratios measure
the adapters, not the head. ``frozen_full_logits`` is the frozen LLM through the ordinary HF head
(full-vocabulary logits at every position), for reference. Steps run round-robin (one of each per
repetition) so that machine noise spreads evenly; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cora.injection import InjectedLinear, InjectionConfig  # noqa: E402
from cora.llm import build_preset, load_tokenizer  # noqa: E402
from cora.scoring import Batch, CoRAModel  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class NaiveLinear(nn.Module):
    """The obvious implementation: build W + scale * P A_b^T per sample and multiply by it."""

    def __init__(self, injected: InjectedLinear):
        super().__init__()
        self.inner = injected

    def forward(self, x):
        m = self.inner
        a = m.variant._a(m)                                                  # (B, d_in, r), scaled
        w = m.base.weight.unsqueeze(0) + torch.matmul(m.lora_P, a.transpose(1, 2))  # (B, out, in)
        x = F.dropout(x, m.dropout, m.training)  # (the naive path also drops out the base input)
        y = torch.bmm(x, w.transpose(1, 2))                                 # (B, T, out)
        return y if m.base.bias is None else y + m.base.bias


def make_naive(model: CoRAModel) -> CoRAModel:
    names = {id(m): n for n, m in model.llm.named_modules()}
    for m in model.injection.modules:
        parent, _, attr = names[id(m)].rpartition(".")
        setattr(model.llm.get_submodule(parent), attr, NaiveLinear(m))
    return model


def yes_head(hidden: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits((hidden[:, -1] @ w).float(), labels)


def build(args):
    tok = load_tokenizer("smollm2")
    yes = tok(" Yes", add_special_tokens=False).input_ids[-1]
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    new = lambda: build_preset("smollm2-135m-shape", tok, dtype, seed=0).requires_grad_(False).to(dev).train()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=g).to(dev)
    labels = torch.randint(0, 2, (args.batch,), generator=g).float().to(dev)
    emb = torch.randn(args.batch, 256, generator=g).to(dev)
    batch = Batch(ids, torch.full((args.batch,), args.seq, device=dev), emb, emb.clone(), labels)
    inj = InjectionConfig(rank=args.rank, alpha=2 * args.rank, dropout=args.dropout, targets=TARGETS)

    frozen = new()
    w_yes = frozen.get_output_embeddings().weight[yes].detach().clone()

    def step_frozen():
        x = frozen.get_input_embeddings()(ids).detach().requires_grad_()
        h = frozen.base_model(inputs_embeds=x, use_cache=False).last_hidden_state
        yes_head(h, w_yes, labels).backward()

    def step_full_logits():
        x = frozen.get_input_embeddings()(ids).detach().requires_grad_()
        logits = frozen(inputs_embeds=x, use_cache=False).logits             # (B, T, V)
        F.binary_cross_entropy_with_logits(logits[:, -1, yes].float(), labels).backward()

    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(new(), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                                  target_modules=TARGETS))
    peft_model.train()

    def step_peft():
        h = peft_model.base_model.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        yes_head(h, w_yes, labels).backward()

    cora = CoRAModel(new(), yes, 256, 256, inj).to(dev, dtype).train()
    naive = make_naive(CoRAModel(new(), yes, 256, 256, inj)).to(dev, dtype).train()
    for m in (cora, naive):   # non-zero P, as after some training
        for p in m.injection.parameters():
            nn.init.normal_(p, std=0.02)
    steps = {"frozen": step_frozen, "peft": step_peft,
             "cora": lambda: cora.loss(batch)[0].backward(),
             "naive": lambda: naive.loss(batch)[0].backward(),
             "frozen_full_logits": step_full_logits}
    models = [frozen, peft_model, cora, naive]
    return steps, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each step")
    ap.add_argument("--dropout", type=float, default=0.05, help="adapter dropout (peft, cora, naive)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. naive)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.manual_seed(0)
    steps, models = build(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for s in filter(None, args.skip.split(",")):
        steps.pop(s)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.warmup + args.reps):
        for name, step in steps.items():
            for m in models:
                m.zero_grad(set_to_none=True)
            sync()
            t = time.perf_counter()
            step()
            sync()
            dt = time.perf_counter() - t
            if rep >= args.warmup:
                times[name].append(dt)
            if not args.json:
                print(f"rep {rep} {name}: {dt:.3f}s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"benchmark": "injection", "device": args.device, "dtype": args.dtype,
           "threads": torch.get_num_threads(),
           "model": "smollm2-135m-shape", "batch": args.batch, "seq": args.seq, "rank": args.rank,
           "dropout": args.dropout, "targets": TARGETS, "reps": args.reps,
           "median_s": {k: round(v, 4) for k, v in med.items()}}
    ratios = {f"{k}/frozen": med[k] / med["frozen"] for k in med if k != "frozen" and "frozen" in med}
    if "peft" in med:
        ratios.update({f"{k}/peft": med[k] / med["peft"] for k in ("cora", "naive") if k in med})
    out["ratios"] = {k: round(v, 4) for k, v in ratios.items()}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
