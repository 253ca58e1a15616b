"""What benchmarks/checkpoint.py's in-run comparison rests on: which steps save, and which block each save's held
time and each step are counted in."""

from types import SimpleNamespace

from trainer.checkpoint import Checkpointer

from ..conftest import load_benchmark


def test_blocks_switch_checkpointing_and_count_each_save_in_the_block_it_slows(tmp_path):
    bench = load_benchmark("checkpoint")
    blocks = [False, True, True, False]
    hook = bench.Alternate(warmup=10, block=20, every=10, blocks=blocks)
    # rank 1's Checkpointer: the real ``due``, no uploader thread
    recipe = SimpleNamespace(ckpt=Checkpointer(str(tmp_path / "ck"), 10, 3, tmp_path / "staging", {}, rank=1))
    log, saved_after = [], []
    for step in range(1, 10 + 20 * len(blocks) + 2):          # as Recipe.train_epoch: hooks, then a save if due
        record = {"step": step, "seconds": 1.0, "data_wait": 0.25, "epoch": 0}
        hook.after_step(recipe, record, {})
        log.append(record)
        if recipe.ckpt.due(step):
            recipe.ckpt.save_seconds.append(0.5)
            saved_after.append(step)
    # block k holds steps 10 + 20k + 1 .. 10 + 20(k + 1); a checkpointing block's saves follow its first step's
    # predecessor and its middle step, so the slow steps after each save are its own
    assert saved_after == [30, 40, 50, 60]
    assert [r["step"] for r in log if r["held"]] == [31, 41, 51, 61]
    assert [r["block"] for r in log[:10]] == [-1] * 10 and log[-1]["block"] == -1
    assert [sum(r["block"] == k for r in log) for k in range(4)] == [20] * 4
    rates = bench.block_rates(log, batch=8, workers=2, blocks=blocks)
    assert [r["saves"] for r in rates] == [0, 2, 2, 0] and all(r["epochs"] == 1 for r in rates)
    plain, held = 20 * 16 / (20 * 1.25), 20 * 16 / (20 * 1.25 + 2 * 0.5)
    assert [round(r["rate"], 6) for r in rates] == [round(x, 6) for x in (plain, held, held, plain)]


def test_cost_per_save_splits_a_checkpointing_blocks_excess_into_the_save_and_the_steps_after_it():
    """cost_per_save: against the pair's block without saves (1.0 s steps), a block whose saves hold the loop
    0.5 s and slow the first step after each by 0.3 s (forward 0.1, backward 0.2) and the second by 0.1 s
    reports exactly that per save, and nothing for the other steps."""
    bench = load_benchmark("checkpoint")
    blocks = [False, True, True, False]
    log = []
    for k, saves in enumerate(blocks):
        for i in range(20):                 # a checkpointing block's saves precede its steps 0 and 10
            after = i % 10 if saves else None
            extra = {0: (0.1, 0.2), 1: (0.05, 0.05)}.get(after, (0.0, 0.0))
            log.append({"block": k, "held": 0.5 if after == 0 else 0.0, "data_wait": 0.1, "forward": 0.4 + extra[0],
                        "backward": 0.4 + extra[1], "optimizer": 0.1, "seconds": 0.9 + sum(extra)})
    got = bench.cost_per_save(log, [0, 1], blocks)
    want = {"held": 0.5, "first_step_after": 0.3, "second_step_after": 0.1, "other_steps": 0.0,
            "first_step_after_forward": 0.1, "first_step_after_backward": 0.2, "first_step_after_optimizer": 0.0,
            "first_step_after_data_wait": 0.0}
    assert got == want
