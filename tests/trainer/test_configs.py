"""Every shipped config validates (alone, and with each LLM size preset layered over it)."""

from pathlib import Path

import pytest

from cora.config import ConfigError, from_dict, load
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))
PRESETS = sorted((ROOT / "llm").glob("*.yaml"))
LOCAL_ONLY = ["llm.name=tiny-llama"]   # configs naming a /models/... directory: validate the rest here


def test_there_are_configs_and_each_starts_with_its_command():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "collm-ml1m.yaml"} and len(PRESETS) >= 4
    for p in CONFIGS + PRESETS:
        head = p.read_text().splitlines()[:5]
        assert any("cora train --config" in line or "./launch.sh demo" in line for line in head), p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    cfg = load(TrainConfig, path, LOCAL_ONLY if "/models/" in path.read_text() else [])
    assert cfg.run.workers >= 1 and cfg.engine.micro_batch_size >= 1


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_layer_over_the_reproduction_config(preset):
    cfg = load(TrainConfig, [ROOT / "collm-ml1m.yaml", preset], LOCAL_ONLY)
    want = load(TrainConfig, preset, LOCAL_ONLY)
    assert cfg.engine.bf16 == want.engine.bf16 and cfg.llm.dtype == want.llm.dtype
    assert cfg.run.workers == 8                                # the base config's value survives


def test_the_global_batch_sets_the_accumulation_and_leaves_the_config_as_written():
    from trainer.engine import EngineConfig, ds_config
    e = EngineConfig(micro_batch_size=2, global_batch_size=16)
    ds = ds_config(e, 4)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    assert e.gradient_accumulation == 1 and e.global_batch_size == 16          # nothing written back
    ds = ds_config(e, 8)                                                      # more workers, the same batch
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 16
    ds = ds_config(EngineConfig(micro_batch_size=2, gradient_accumulation=3), 2)
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 12


def test_auto_zero3_sizes_follow_the_models_hidden_size():
    from trainer.engine import EngineConfig, ds_config
    zero = ds_config(EngineConfig(), 2)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0 and "stage3_prefetch_bucket_size" not in zero
    auto = EngineConfig(persistence_threshold="auto", prefetch_bucket_size="auto")
    zero = ds_config(auto, 8, hidden_size=4096)["zero_optimization"]           # Llama-2-7B's h
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2) and zero["reduce_bucket_size"] == 4096 ** 2
    assert ds_config(EngineConfig(prefetch_bucket_size=123), 2)["zero_optimization"]["stage3_prefetch_bucket_size"] == 123
    with pytest.raises(ValueError, match="is 'auto': pass the LLM's hidden size"):
        ds_config(auto, 8)
    with pytest.raises(ConfigError, match="persistence_threshold must be >= 0 or 'auto', got -1"):
        from_dict(TrainConfig, {"engine": {"persistence_threshold": -1}})
    cfg = load(TrainConfig, [ROOT / "collm-ml1m.yaml", ROOT / "llm" / "llama-7b.yaml"], LOCAL_ONLY)
    assert (cfg.engine.persistence_threshold, cfg.engine.prefetch_bucket_size) == ("auto", "auto")


def test_the_eval_batch_defaults_to_the_micro_batch_and_is_validated():
    cfg = load(TrainConfig, ROOT / "demo.yaml")
    assert cfg.data.eval_batch_size is None and cfg.data.eval_batch(cfg.engine.micro_batch_size) == 8
    cfg = load(TrainConfig, ROOT / "demo.yaml", ["data.eval_batch_size=64"])
    assert cfg.data.eval_batch(cfg.engine.micro_batch_size) == 64 and cfg.engine.micro_batch_size == 8
    collm = load(TrainConfig, ROOT / "collm-ml1m.yaml", LOCAL_ONLY)  # micro-batch 1: eval needs a batch of its own
    assert collm.engine.micro_batch_size == 1 and collm.data.eval_batch(1) == 16
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, ROOT / "demo.yaml", ["data.eval_batch_size=0", "data.prefetch=0"])
    assert "data.eval_batch_size must be >= 1 or null (= engine.micro_batch_size), got 0" in str(e.value)
    assert "data.prefetch must be >= 1, got 0" in str(e.value)             # every problem at once
