"""trainer.evaluate.Progress: rank 0's evaluation progress lines (a fake clock, no workers)."""

import io

from trainer.evaluate import Progress


def test_progress_prints_every_interval_never_per_batch_and_a_total_at_the_end():
    now = [100.0]
    out = io.StringIO()
    p = Progress("test", batches=125, world=2, every=10.0, clock=lambda: now[0], out=out)
    for _ in range(40):                  # 40 batches of 4 real samples per rank, 0.5 s each
        now[0] += 0.5
        p.update(4)
    lines = out.getvalue().splitlines()
    assert lines == ["[eval] test: 20/125 batches, 16 samples/s, ETA 0:00:52",
                     "[eval] test: 40/125 batches, 16 samples/s, ETA 0:00:42"]
    for _ in range(85):
        now[0] += 0.5
        p.update(4)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 7 and not any("125/125" in line for line in lines)   # the end: the total line only
    assert lines[-1] == "[eval] test: 125 batches, 1000 samples in 0:01:02 (16 samples/s)"
