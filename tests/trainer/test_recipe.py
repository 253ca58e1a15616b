"""trainer.recipe's step records: the padding accounting of a micro-batch, and a step's window combined."""

import numpy as np

from trainer.recipe import combine, padding


def test_padding_counts_right_padding_and_weight_0_samples_as_waste():
    raw = {"input_ids": np.zeros((3, 7), dtype=np.int64), "lengths": np.array([7, 4, 5]),
           "weights": np.array([1.0, 1.0, 0.0], dtype=np.float32)}
    # real: 7 + 4 (the weight-0 sample's 5 tokens are waste); slots 3 x 7 = 21
    assert padding(raw) == (11, 10)
    raw["weights"][:] = 1.0
    assert padding(raw) == (16, 5)


def test_a_steps_record_sums_its_micro_batches_tokens_and_padding():
    record = {"loss": 1.0, "finite": True, "sample_ids": [1], "forward": 0.1, "backward": 0.2, "optimizer": 0.0,
              "seconds": 0.3, "data_wait": 0.0, "samples": 2.0, "tokens": 11, "padded": 10, "lookup_s": 0.01}
    out = combine([record, dict(record, loss=3.0, tokens=5, padded=1, sample_ids=[2])])
    assert (out["tokens"], out["padded"], out["loss"], out["micro_batches"]) == (16, 11, 2.0, 2)
