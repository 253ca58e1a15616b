import json

import pytest

from trainer.cli import main


@pytest.mark.slow
def test_demo_prints_cora_above_the_no_cf_baseline(capsys):
    assert main(["demo", "--samples", "400", "--epochs", "12", "--users", "50", "--items", "50"]) == 0
    out = json.loads(capsys.readouterr().out)["test"]
    assert out["cora"]["n"] == 80 and out["lora_without_cf"]["n"] == 80
    assert out["cora"]["auc"] > 0.8 > out["lora_without_cf"]["auc"] + 0.15


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--samples", "0", "--epochs", "-1"]) == 2
    assert "cora demo: error: --samples must be >= 1, got 0; --epochs must be >= 1, got -1" in capsys.readouterr().err
