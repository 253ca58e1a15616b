"""``cora demo``: single-process CoRA against LoRA without CF (the TALLRec-style baseline) on planted
synthetic data, the planted factors standing in for the CF embeddings. No Ray, no DeepSpeed: it shows
the method's effect in a minute on a laptop (``./launch.sh demo`` runs the whole distributed pipeline).

    cora demo [--llm tiny-llama] [--rule additive|dot] [--samples 1000] ...
"""

from __future__ import annotations

import json
import sys
import time


def _demo_data(args, tokenizer):
    from cora.local import Samples
    from cora.prompts import PromptEncoder, get_template
    from cora.synthetic import planted

    d = planted(n_users=args.users, n_items=args.items, n_samples=args.samples, dim=args.dim,
                history_len=3, text_pool=4, rule=args.rule, seed=args.seed)
    enc = PromptEncoder(tokenizer, get_template("movies"), max_history=3, max_length=256)
    prompts = [enc.encode(h, t) for h, t in zip(d.histories, d.targets)]
    cut = int(0.8 * len(prompts))

    def part(s):
        return Samples(prompts[s], d.user_factors[d.users[s]], d.item_factors[d.items[s]],
                       d.labels[s], d.users[s])
    return part(slice(0, cut)), part(slice(cut, None))


def demo(args) -> int:
    import torch

    from cora.generator import GeneratorConfig
    from cora.injection import InjectionConfig
    from cora.llm import LLMConfig, load_llm, resolve_answer_token
    from cora.local import fit, predict
    from cora.metrics import evaluate
    from cora.optim import OptimConfig
    from cora.scoring import CoRAModel

    torch.manual_seed(args.seed)
    kind = "a real pretrained LLM" if args.llm == "smollm2-135m" else "a randomly initialised preset"
    print(f"[demo] LLM: {args.llm} ({kind}); data: planted synthetic, rule={args.rule}, "
          f"{args.samples} samples; CF embeddings: the planted factors", file=sys.stderr)
    _, tok = load_llm(LLMConfig(name=args.llm))
    train, test = _demo_data(args, tok)
    gen = GeneratorConfig(hidden_size=args.gen_hidden, num_layers=args.gen_layers, num_heads=4,
                          intermediate_size=2 * args.gen_hidden, dropout=0.0)
    results = {}
    for method in ("cora", "tallrec"):
        llm, _ = load_llm(LLMConfig(name=args.llm, seed=args.seed))
        model = CoRAModel(llm, resolve_answer_token(tok), args.dim, args.dim, InjectionConfig(), gen, method=method)
        t = time.time()
        fit(model, train, epochs=args.epochs, batch_size=args.batch_size, pad_id=tok.pad_token_id,
            optim=OptimConfig(lr_peak=args.lr, lr_end=args.lr / 10, warmup_steps=10), seed=args.seed,
            log=lambda m, a=method: print(f"[demo] {a}: {m}", file=sys.stderr))
        scores = predict(model, test, batch_size=64, pad_id=tok.pad_token_id)
        res = evaluate(test.labels, scores, test.users)
        res["train_seconds"] = round(time.time() - t, 1)
        results["cora" if method == "cora" else "lora_without_cf"] = res
    print(json.dumps({"test": results}, indent=2))
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="single-process CoRA vs. LoRA-without-CF on planted synthetic data",
                       description=__doc__)
    d.add_argument("--llm", default="tiny-llama", help="preset name, 'smollm2-135m', or a local model dir")
    d.add_argument("--samples", type=int, default=1000)
    d.add_argument("--users", type=int, default=100)
    d.add_argument("--items", type=int, default=100)
    d.add_argument("--dim", type=int, default=8, help="CF embedding size")
    d.add_argument("--rule", choices=["dot", "additive"], default="additive",
                   help="how planted labels depend on the factors (see cora.synthetic)")
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--gen-hidden", type=int, default=64, help="Q-Former hidden size (paper: 512)")
    d.add_argument("--gen-layers", type=int, default=2, help="Q-Former layers (paper: 8)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=main)


def main(args) -> int:
    bad = [f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}"
           for k in ("samples", "users", "items", "dim", "epochs", "batch_size", "gen_hidden", "gen_layers")
           if getattr(args, k, 1) < 1]
    if bad:
        print(f"cora demo: error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    return demo(args)
