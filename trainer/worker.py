"""The Ray Train side of ``cora train``: the per-step function and the worker-group entry point.

``train_loop`` is what Ray Train runs in every worker process: it builds a ``trainer.recipe.Recipe``
from the validated ``TrainConfig`` and the driver's ``Handover`` and runs its life cycle
(set-up, restore, train/evaluate/save per epoch, clean-up). After a failure Ray Train calls it again in
a new worker group, which resumes from the newest committed checkpoint. ``run`` starts the group.
"""

from __future__ import annotations

import time


def train_step(engine, raw: dict) -> dict:
    """One micro-batch: forward, backward and ``engine.step()`` (DeepSpeed steps the optimiser at the end of
    an accumulation window only). The record holds the loss, the learning rate this step trains with and
    the time of each phase (on CUDA, synchronised at each phase's end so that the times are the GPU's)."""
    import torch

    from cora.scoring import Batch
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    batch = Batch.from_arrays(raw, engine.device)     # DeepSpeed does not move inputs; pinned + async on CUDA
    loss, logits = engine(batch, with_loss=True)      # the method's loss (BCE; RecCocktail's merge: entropy)
    sync()
    t1 = time.perf_counter()
    engine.backward(loss)
    engine.module.method.after_backward(engine.module, batch)   # BDLM: the store rows' gradients
    if engine.module.injection is not None:
        engine.module.injection.release()             # a recomputation stopped early may have left one
    sync()
    t2 = time.perf_counter()
    lr = float(engine.get_lr()[0])                    # before step(): the rate the optimiser applies now
    engine.step()
    sync()
    t3 = time.perf_counter()
    norm = engine.get_global_grad_norm()
    return {"loss": float(loss.detach()), "finite": bool(torch.isfinite(logits).all()), "forward": t1 - t0,
            "backward": t2 - t1, "optimizer": t3 - t2, "seconds": t3 - t0, "lr": lr,
            "grad_norm": None if norm is None else float(norm)}


def train_loop(config: dict) -> None:
    """Ray Train entry point; ``config``: {"payload": bytes}, the pickled {"cfg": TrainConfig, "handover":
    trainer.recipe.Handover}."""
    import ray.cloudpickle
    import ray.train

    from .recipe import Recipe
    parts = ray.cloudpickle.loads(config["payload"])
    recipe = Recipe(parts["cfg"], parts["handover"])
    state = recipe.fit()
    ray.train.report({"loss": recipe.last_loss, "steps": state.step})


def run(cfg, handover, storage_path: str, name: str = "cora", max_failures: int = 0):
    """Start the worker group (``cfg.run.workers`` ranks; gloo on CPU, NCCL on GPU) and train; after a
    failure Ray Train starts a new group (up to ``max_failures`` times), which resumes from the newest
    committed checkpoint.

    The group's controller (a Ray actor of its own) unpickles the loop's config. Handed over as objects,
    the TrainConfig and Handover would make it import their modules, torch and transformers among them
    (5 s of CPU at every start, beside the workers' own imports on a 2-core machine); as bytes only the
    workers unpickle them. This module imports nothing heavy at its top for the same reason (the
    controller imports it for ``train_loop``)."""
    import ray.cloudpickle
    payload = ray.cloudpickle.dumps({"cfg": cfg, "handover": handover})
    return trainer_for(cfg, train_loop, {"payload": payload}, storage_path, name, max_failures).fit()


def trainer_for(cfg, loop, loop_config: dict, storage_path: str, name: str = "cora", max_failures: int = 0):
    """The TorchTrainer of ``cfg``'s worker group running ``loop(loop_config)``. Its workers are given the
    storage endpoint and region only (``cora.fileio.storage_env``: a runtime_env shows in the dashboard);
    they find their storage credentials in their node's environment or role."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cora.fileio import storage_env
    gpu = cfg.run.device == "cuda"
    return TorchTrainer(loop, train_loop_config=loop_config,
                        scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=gpu,
                                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
                        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                        run_config=RunConfig(storage_path=storage_path, name=name,
                                             failure_config=FailureConfig(max_failures=max_failures),
                                             worker_runtime_env={"env_vars": storage_env()}))
