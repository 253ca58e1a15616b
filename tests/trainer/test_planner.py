"""cora plan: the command line over cora.plan (a preset's shape, the generator counted)."""

import json

from cora.plan import CPU, Setup, Shape, plan
from trainer.cli import main


def test_cora_plan_prints_the_plan_of_each_world_size(capsys):
    assert main(["plan", "--llm", "tiny-llama", "--workers", "1,2", "--seq-len", "100", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["setup"]["world"] for r in rows] == [1, 2] and rows[0]["params"] == 3_219_776
    # the demo generator (hidden 64, 2 layers) at d_model 64, r 16: 183,808 parameters in 29 modules
    s = rows[1]["setup"]
    assert (s["generator_params"], s["generator_head_params"], s["generator_modules"]) == (183_808, 66_560, 29)
    want = plan(Setup(**{**s, "shape": Shape(**s["shape"])}), CPU)
    assert rows[1]["memory_mib"]["peak"] == round(want.memory["peak"] / 2**20, 1)
    assert rows[1]["time_s"]["step"] == round(want.time["step"], 4)
    assert rows[1]["trainable_params"] == 183_808 + 2 * 16 * (64 + 32 + 32 + 64)


def test_cora_plan_says_what_was_wrong(capsys):
    assert main(["plan", "--llm", "tiny-llama", "--workers", "1,two"]) == 2
    assert "--workers '1,two' is not a comma-separated list of integers" in capsys.readouterr().err
    assert main(["plan", "--llm", "tiny-llama", "--micro-batch", "0"]) == 2
    assert "micro_batch must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", "--llm", "/no/such/model"]) == 2
    assert "--llm '/no/such/model' is neither a preset" in capsys.readouterr().err
    assert main(["plan", "--llm", "tiny-gpt2"]) == 2                 # GPT-2's config has no intermediate_size
    assert "needs a Llama-style config" in capsys.readouterr().err


def test_cora_plan_auto_names_the_choice(capsys):
    assert main(["plan", "--llm", "llama-2-7b-shape", "--workers", "8", "--dtype", "bfloat16", "--hardware", "h100",
                 "--partitioning", "auto", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "replicated" in out and "zero3 would take" in out
