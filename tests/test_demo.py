"""The README's main command, `./launch.sh demo`, as a new user runs it: an empty HOME and CORA_CACHE
(nothing cached by earlier runs), shortened by overrides. It must finish and CoRA must beat the frozen
LLM without injection on the test split."""

import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[demo\] test AUC: CoRA ([0-9.]+) \| the frozen LLM without injection ([0-9.]+) \| "
                  r"MF alone ([0-9.]+)")


def test_the_demo_runs_in_a_clean_state_and_cora_beats_the_llm_without_injection(tmp_path):
    home, cache, out = tmp_path / "home", tmp_path / "cache", tmp_path / "demo"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), CORA_CACHE=str(cache), CORA_DEMO_DIR=str(out))
    done = subprocess.run([str(ROOT / "launch.sh"), "demo", "run.epochs=1", "run.max_steps=60"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    printed = json.loads(done.stdout)                        # stdout: the run's JSON only
    found = LINE.search(done.stderr)
    assert found, done.stderr[-3000:]
    cora, frozen, mf = map(float, found.groups())
    assert cora > frozen + 0.05, (cora, frozen)
    assert mf > 0.6, mf                                       # MF learns the planted propensities
    # the figures are the run's own: recomputed from the predictions it wrote
    preds = pq.read_table(out / "run" / "test_predictions.parquet").to_pandas()
    test = pq.read_table(out / "data" / "test.parquet").to_pandas().set_index("sample_id")
    assert sorted(preds["sample_ids"]) == sorted(test.index)
    assert (preds["labels"].to_numpy() == test.loc[preds["sample_ids"], "label"].to_numpy()).all()
    recomputed = roc_auc_score(preds["labels"], preds["scores"])
    assert abs(recomputed - cora) <= 5e-4 and abs(recomputed - printed["test"]["auc"]) < 1e-9
    assert printed["steps"] == 60
    assert (cache / "tokenizers" / "smollm2" / "tokenizer.json").is_file()     # built here, from the package
