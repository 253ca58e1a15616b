"""The ``cora`` command line (DESIGN.md section 7). It lives in ``trainer/`` because ``train`` and
``eval`` start Ray and DeepSpeed, which ``cora/`` (the method, one process) never imports.

    cora prepare  --source ... --out DATA_DIR          the data (cora/data/prepare.py)
    cora train-cf --data DATA_DIR --out CF_DIR         the CF model (cora/cf/cli.py)
    cora train    --config CONFIG.yaml [key=value ...] CoRA with ZeRO-3 workers on Ray (trainer/train.py)
    cora eval     --run RUN [--checkpoint best] [--device cuda]  one process, no DeepSpeed (trainer/run_eval.py)
    cora compare  --config CONFIG.yaml --methods mf,tallrec,cora --out OUT_DIR   methods side by side (trainer/compare.py)
    cora demo     [--llm tiny-llama] ...               single-process CoRA vs. a no-CF LoRA baseline (cora/demo.py)
    cora plan     --llm NAME --workers 1,2 ...         per-rank memory and step time, planned (trainer/planner.py)
    cora scale    --config C --sizes A,B --workers 1,2 --out DIR   a scaling study's report (trainer/scale.py)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cora", description="CoRA: collaborative LoRA LLM recommenders")
    sub = ap.add_subparsers(dest="command", required=True)
    from cora.demo import add_parser as add_demo
    add_demo(sub)
    from cora.data.prepare import add_parser as add_prepare
    add_prepare(sub)
    from cora.cf.cli import add_parser as add_train_cf
    add_train_cf(sub)
    from trainer.train import add_parser as add_train
    add_train(sub)
    from trainer.run_eval import add_parser as add_eval
    add_eval(sub)
    from trainer.compare import add_parser as add_compare
    add_compare(sub)
    from trainer.planner import add_parser as add_plan
    add_plan(sub)
    from trainer.scale import add_parser as add_scale
    add_scale(sub)
    args = ap.parse_args(argv)
    from cora.data.schema import DatasetError
    try:
        return args.func(args)
    except DatasetError as e:
        print(f"cora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
