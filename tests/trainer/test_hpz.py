"""engine.partitioning=hpz over 4 gloo ranks as 2 "nodes" of 2 (DeepSpeed's hpZ: a secondary partition of the
frozen base over each node's ranks): a shape preset built partitioned (the path where the secondary partitions
were cut before the weights were written) scores exactly what one process's whole build scores, at the first
forward (gathered over all ranks) and at the next ones (gathered within the node, from the secondary
partitions), and the training step runs; workers placed unevenly over the nodes are refused on every rank."""

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
TINY_SHAPE = "tiny-shape-for-hpz"
WORLD, NODE = 4, 2


def register_tiny_shape() -> None:
    """A shape preset of tiny-llama's size (built as every shape preset is: partitioned, then written)."""
    from cora import llm
    spec = ("llama", llm._llama(64, 128, 2, 4, 2, 49152, True, 10000.0, 512))
    llm.SHAPES[TINY_SHAPE] = llm.PRESETS[TINY_SHAPE] = spec


class Scalar(torch.nn.Module):
    """The frozen LLM's full logits at the last position x one trainable scalar (DeepSpeed needs a parameter
    to train)."""

    def __init__(self, llm):
        super().__init__()
        self.llm, self.scale = llm, torch.nn.Parameter(torch.ones(()))

    def forward(self, ids):
        return self.llm(input_ids=ids).logits[:, -1] * self.scale


def rank_main(rank: int, port: int, tmp: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % NODE))
    torch.set_num_threads(1)
    register_tiny_shape()
    import deepspeed

    from cora.llm import LLMConfig
    from trainer.engine import (EngineConfig, build_llm, ds_config, frozen_weights, init_distributed,
                                node_ranks_agreed, partition_stats)
    init_distributed("cpu")
    try:                               # workers placed unevenly (rank 0 alone on its node): refused on every rank
        node_ranks_agreed(1 if rank == 0 else NODE)
        uneven = ""
    except ValueError as e:
        uneven = str(e)
    assert node_ranks_agreed(NODE) == NODE
    ds = ds_config(EngineConfig(partitioning="hpz", micro_batch_size=2), WORLD, local_ranks=NODE)
    llm, _ = build_llm(LLMConfig(name=TINY_SHAPE), ds, "hpz")
    model = Scalar(llm)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[model.scale], config=ds,
                                      optimizer=torch.optim.SGD([model.scale], lr=0.0))
    ids = torch.arange(12).view(2, 6) * 997 % 49152
    logits = []
    for _ in range(3):
        out = engine(ids)
        engine.backward(out.square().mean())
        engine.step()
        logits.append(out.detach())
        if len(logits) == 1:
            after_first = partition_stats(frozen_weights(llm))
    torch.save({"uneven": uneven, "logits": logits, "after_first": after_first, "hpz": ds["zero_optimization"]["zero_hpz_partition_size"],
                "group": deepspeed.utils.groups._get_zero_param_intra_parallel_group_world_size()},
               Path(tmp, f"rank{rank}.pt"))
    deepspeed.comm.barrier()
    os._exit(0)                    # without gloo's teardown (see tests/trainer/test_zero_state.py)


def test_hpz_scores_what_one_process_scores_before_and_after_its_secondary_partitions_exist(tmp_path):
    import torch.multiprocessing as mp

    from cora.llm import LLMConfig, load_llm
    register_tiny_shape()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, str(tmp_path)), nprocs=WORLD)
    whole, _ = load_llm(LLMConfig(name=TINY_SHAPE))            # one process, the whole model
    ids = torch.arange(12).view(2, 6) * 997 % 49152
    with torch.no_grad():
        expected = whole(input_ids=ids).logits[:, -1]
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["hpz"] == NODE and got["group"] == NODE          # secondary groups of 2 ranks: two "nodes"
        assert "the nodes hold [1, 2] (per rank: [1, 2, 2, 2])" in got["uneven"]
        stats = got["after_first"]
        # a quarter of every frozen weight as the primary partition, half of it as the node's secondary one
        assert stats["share"] == pytest.approx(1 / WORLD, abs=0.01)
        assert stats["secondary"] == pytest.approx(stats["total"] / NODE, rel=0.01)
        for step, logits in enumerate(got["logits"]):              # 1st: over all 4 ranks; then within the node
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=f"rank {r}, forward {step}")
