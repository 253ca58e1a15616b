from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from cora.config import ConfigError, from_dict, load, merge, parse_overrides, to_dict


@dataclass
class Injection:
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    mode: Literal["shared", "per_layer"] = "shared"
    dropout: Optional[float] = None

    def validate(self) -> list[str]:
        return ["rank must be > 0"] if self.rank <= 0 else []


@dataclass
class Model:
    name: str
    layers: list[int] = field(default_factory=list)
    shape: tuple[int, int] = (1, 2)
    use_cache: bool = True
    extra: dict = field(default_factory=dict)
    injection: Injection = field(default_factory=Injection)


@dataclass
class Run:
    model: Model
    seed: int = 0
    lr: float = 1e-4
    out_dir: str | None = None

    def validate(self) -> list[str]:
        return ["lr must be positive"] if self.lr <= 0 else []


VALID = {
    "model": {
        "name": "qwen",
        "layers": [0, 1, 2],
        "shape": [4, 8],
        "extra": {"k": 1},
        "injection": {"rank": 8, "alpha": 16, "targets": ["q_proj"], "mode": "per_layer"},
    },
    "seed": 3,
    "lr": 0.001,
}


def _err(cls, data) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        from_dict(cls, data, source="run.yaml")
    return ei.value


def test_valid_round_trip():
    run = from_dict(Run, VALID)
    assert isinstance(run.model.injection, Injection)
    assert run.model.injection.rank == 8
    assert run.model.injection.alpha == 16.0 and isinstance(run.model.injection.alpha, float)
    assert run.model.injection.mode == "per_layer"
    assert run.model.use_cache is True  # default kept
    d = to_dict(run)
    assert d["model"]["shape"] == [4, 8]  # lists, not tuples
    assert d["model"]["injection"]["targets"] == ["q_proj"]
    assert from_dict(Run, d) == run
    assert from_dict(Run, yaml.safe_load(yaml.safe_dump(d))) == run


def test_three_problems_reported_together():
    data = merge(VALID, {
        "model": {"injection": {"rnak": 4, "rank": 0}},  # typo + fails validate
        "seed": "three",  # wrong type
    })
    e = _err(Run, data)
    assert len(e.problems) == 3, e.problems
    text = str(e)
    assert text.splitlines()[0] == "3 problems in config 'run.yaml':"
    assert "unknown key 'model.injection.rnak'" in text
    assert "did you mean 'rank'?" in text
    assert "alpha" in text  # valid keys listed
    assert "seed" in text and "'three'" in text and "int" in text
    assert "model.injection: rank must be > 0" in text
    assert len(text.splitlines()) == 4  # header + one line per problem


def test_missing_required_and_nested_type_errors():
    e = _err(Run, {"model": {"layers": [1, "x"], "injection": {"mode": "global"}}})
    text = str(e)
    assert "missing required key 'model.name'" in text
    assert "model.layers[1]" in text
    assert "'global'" in text and "'shared'" in text and "'per_layer'" in text
    assert len(e.problems) == 3
    # a missing required top-level section is reported too
    assert any("'model'" in p for p in _err(Run, {}).problems)


def test_bool_is_not_int_but_int_is_float():
    e = _err(Run, {"model": {"name": "m"}, "seed": True})
    assert len(e.problems) == 1 and "seed" in e.problems[0] and "True" in e.problems[0]
    assert from_dict(Run, {"model": {"name": "m"}, "lr": 2}).lr == 2.0
    e = _err(Run, {"model": {"name": "m", "use_cache": 1}})
    assert "model.use_cache" in e.problems[0]


def test_optional_fields():
    run = from_dict(Run, {"model": {"name": "m", "injection": {"dropout": 0.1}}, "out_dir": None})
    assert run.model.injection.dropout == 0.1 and run.out_dir is None
    e = _err(Run, {"model": {"name": "m", "injection": {"dropout": "lots"}}, "out_dir": 5})
    assert len(e.problems) == 2
    assert any("model.injection.dropout" in p for p in e.problems)
    assert any("out_dir" in p for p in e.problems)


def test_validate_runs_only_for_sections_whose_types_pass():
    # model.name has a type problem, so Model (and the Run containing it) cannot be
    # built and Run.validate() is skipped; the nested Injection section is fine
    # type-wise, so its validate() still runs and reports.
    e = _err(Run, {"model": {"name": 1, "injection": {"rank": -1}}, "lr": -1.0})
    assert len(e.problems) == 2, e.problems
    assert e.problems[0].startswith("model.name: expected str")
    assert e.problems[1] == "model.injection: rank must be > 0"
    # with types fixed, the top-level validate() is reported, prefixed by class name
    e = _err(Run, {"model": {"name": "m", "injection": {"rank": -1}}, "lr": -1.0})
    assert e.problems == ["model.injection: rank must be > 0", "Run: lr must be positive"]


def test_parse_overrides_types():
    o = parse_overrides([
        "model.injection.rank=4",
        "lr=1e-3",
        "model.use_cache=false",
        "model.injection.targets=[q_proj,v_proj,o_proj]",
        "model.injection.alpha=8.5",
        "model.name=llama",
    ])
    assert o["model"]["injection"]["rank"] == 4 and type(o["model"]["injection"]["rank"]) is int
    assert o["lr"] == 1e-3 and type(o["lr"]) is float
    assert o["model"]["use_cache"] is False
    assert o["model"]["injection"]["targets"] == ["q_proj", "v_proj", "o_proj"]
    assert o["model"]["injection"]["alpha"] == 8.5
    assert o["model"]["name"] == "llama"


def test_bad_override_form():
    with pytest.raises(ConfigError) as ei:
        parse_overrides(["seed=1", "model.injection.rank"])
    assert "model.injection.rank" in str(ei.value)
    assert "key=value" in str(ei.value)
    assert len(ei.value.problems) == 1


def test_merge_is_deep_and_pure():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = merge(base, {"a": {"b": 10}, "e": 5})
    assert out == {"a": {"b": 10, "c": 2}, "d": 3, "e": 5}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}
    out["a"]["c"] = 99
    assert base["a"]["c"] == 2


def test_load_yaml_with_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(VALID))
    run = load(Run, p, ["model.injection.rank=2", "lr=1e-3", "model.use_cache=false",
                        "model.injection.targets=[k_proj]"])
    assert run.model.injection.rank == 2
    assert run.lr == 1e-3
    assert run.model.use_cache is False
    assert run.model.injection.targets == ["k_proj"]
    assert run.model.injection.alpha == 16.0  # untouched by overrides


def test_load_override_errors_name_source(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(VALID))
    with pytest.raises(ConfigError) as ei:
        load(Run, p, ["model.injection.rank=0", "model.injection.mdoe=shared"])
    text = str(ei.value)
    assert str(p) in text.splitlines()[0]
    assert "did you mean 'mode'?" in text and "rank must be > 0" in text


def test_load_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(Run, tmp_path / "nope.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: m\n  layers: [1, 2\nseed: 1\n")
    with pytest.raises(ConfigError) as ei:
        load(Run, bad)
    assert "invalid YAML" in str(ei.value)
    assert "line 4" in str(ei.value)

    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(Run, lst)
