"""What benchmarks/injection.py's figures rest on: every variant's adapter dropout is this project's (peft's
modules replaced, same rate), the variants' order rotates per repetition, and each ratio is taken within a
repetition and reported with its spread."""

import statistics
from types import SimpleNamespace

import torch

from ..conftest import load_benchmark


def test_peft_dropout_is_replaced_by_the_projects_at_the_same_rate(tokenizer):
    from peft import LoraConfig, get_peft_model

    from cora.llm import build_preset
    bench = load_benchmark("injection")
    model = get_peft_model(build_preset("tiny-llama", tokenizer, torch.float32, seed=0),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=bench.TARGETS))
    assert bench.same_dropout(model, 0.3) == 4 * 2                   # q/k/v/o in 2 layers
    drops = [m for m in model.modules() if isinstance(m, bench.SameDropout)]
    assert len(drops) == 8 and not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    x = torch.ones(64, 1000)
    torch.manual_seed(0)
    y = drops[0].train()(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.01          # the rate
    assert abs(y.mean().item() - 1.0) < 0.02                          # unbiased: kept values scaled by 1/(1-p)
    assert torch.equal(drops[0].eval()(x), x)


def test_the_order_rotates_and_ratios_are_per_repetition_with_their_spread():
    bench = load_benchmark("injection")
    order = []
    fake = ("frozen", "lora", "cora")

    def step(name):
        def run():
            order.append(name)
        return run
    args = SimpleNamespace(warmup=1, reps=6, json=True, device="cpu", dtype="float32", batch=8, seq=128, rank=16,
                           dropout=0.05, shape="smollm2-135m-shape", peak_tflops=None)
    steps = {k: step(k) for k in fake}
    times = bench.timed(steps, [], args, lambda: None)
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 7 and all(sorted(r) == sorted(fake) for r in rounds)
    assert {r[0] for r in rounds} == set(fake) and rounds[0] != rounds[1]   # every variant leads some repetition
    assert all(len(v) == 6 for v in times.values())
    times = {"frozen": [1.0, 2.0, 1.0], "cora": [1.1, 2.0, 1.3], "lora": [1.0, 2.2, 1.3], "peft": [1.5, 2.5, 1.4]}
    out = bench.summary(times, args)
    assert out["ratios"]["cora_over_frozen"] == round(statistics.median([1.1, 1.0, 1.3]), 4)
    assert out["spread"]["cora_over_frozen"] == [1.0, 1.3]
    assert out["ratios"]["cora_over_lora_same_dropout"] == round(statistics.median([1.1, 2.0 / 2.2, 1.0]), 4)
    assert out["median_s"]["peft"] == 1.5 and out["min_s"]["frozen"] == 1.0 and out["max_s"]["lora"] == 2.2
    assert out["tokens_per_s"]["frozen"] == 8 * 128 and "mfu" not in out          # 1 s median, no peak given
    args.peak_tflops, args.matmul_params = 2.0, 10 ** 8                       # MFU = 4 N_mm B T / (s x peak)
    assert bench.summary(times, args)["mfu"] == {k: round(4e8 * 8 * 128 / statistics.median(v) / 2e12, 4)
                                                  for k, v in times.items()}


def test_the_training_paths_frozen_floor_scores_as_the_frozen_llm_and_trains_one_scalar(tokenizer):
    """The ZeRO-3 part's ``frozen``: the frozen LLM's "Yes" logit plus a scalar (0 at start), the only trainable
    parameter, with gradients flowing back to the (detached) input embeddings as in the one-process floor."""
    from cora.llm import build_preset, resolve_answer_token
    from cora.scoring import CoRAModel, collate
    bench = load_benchmark("injection")
    llm = build_preset("tiny-llama", tokenizer, torch.float32, seed=0)
    yes = resolve_answer_token(tokenizer)
    model = CoRAModel(llm, yes, 4, 4, method=bench.FrozenFloor())
    assert model.trainable_parameters() == [model.floor] and model.injection is None
    batch = collate([[5, 6, 7], [8, 9]], torch.zeros(2, 4), torch.zeros(2, 4), [1.0, 0.0])
    with torch.no_grad():
        want = llm(input_ids=batch.input_ids).logits[[0, 1], batch.lengths - 1, yes]
    loss, logits = model.loss(batch)
    torch.testing.assert_close(logits, want)
    loss.backward()
    assert model.floor.grad is not None and model.floor.grad != 0
    assert all(p.grad is None for p in llm.parameters())


def test_ratios_cover_only_the_pairs_that_ran():
    bench = load_benchmark("injection")
    out = bench.ratios({"frozen": [1.0, 2.0], "lora": [1.2, 2.2], "cora": [1.1, 2.4]})
    assert set(out["ratios"]) == {"cora_over_frozen", "cora_over_lora_same_dropout", "lora_over_frozen"}
    assert out["ratios"]["cora_over_frozen"] == round(statistics.median([1.1, 1.2]), 4)
    assert out["spread"]["lora_over_frozen"] == [1.1, 1.2]
