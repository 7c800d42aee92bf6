"""Data-parallel training of the SUM model on a Ray cluster (Ray Train ``TorchTrainer``, DDP over gloo on CPU).

The same eq. 8 loop as :func:`sum_models.train.train_model` (:func:`sum_models.train.run_epochs`), run by
``W`` Ray Train workers: every worker holds the whole encoded frame (one copy in Ray's object store, read
zero-copy), draws the same shuffled order, and trains on its ``1/W`` part of each global batch; DDP averages
the gradients, so one step sees the same ``batch_size`` rows as the single-process loop. The frame is encoded,
the dense inputs' statistics learnt and a fresh model's head priors set once, on the driver, before any
worker starts (:func:`sum_models.train.prepare_training`); worker 0 hands the trained weights back as a Ray
Train checkpoint (safetensors). Same seed, data, initial weights and worker count: the same weights, bit for
bit (gloo sums two workers' gradients in a fixed order).

Example::

    >>> import ray
    >>> from sum_models.distributed import train_model_ray
    >>> stats = train_model_ray(model, df_train, spec, train_cfg, seed=7, workers=2,
    ...                         cpus_per_worker=0.5, storage_path="/tmp/ray-train")  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sum_models.data import UserInputs
from sum_models.spec import FeatureSpec
from sum_models.train import EncodedExamples, TrainStats, _train_config_dict, prepare_training, run_epochs

__all__ = ["train_model_ray", "pack_examples", "unpack_examples"]

_CHECKPOINT_FILE = "model.safetensors"


def pack_examples(examples: EncodedExamples) -> dict[str, Any]:
    """The encoded frame as numpy arrays (Ray's object store hands numpy arrays to readers without a copy)."""
    return {
        "dense": examples.users.dense.numpy(),
        "sparse_ids": [t.numpy() for t in examples.users.sparse_ids],
        "sparse_offsets": [t.numpy() for t in examples.users.sparse_offsets],
        "ad_sparse": examples.ad_sparse.numpy(),
        "ad_dense": examples.ad_dense.numpy(),
        "labels": examples.labels.numpy(),
    }


def unpack_examples(packed: dict[str, Any]) -> EncodedExamples:
    """Inverse of :func:`pack_examples` (tensors share the arrays' memory; the loop never writes to them)."""
    def t(a: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only object-store memory: fine, nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)

    users = UserInputs(dense=t(packed["dense"]), sparse_ids=[t(a) for a in packed["sparse_ids"]],
                       sparse_offsets=[t(a) for a in packed["sparse_offsets"]])
    return EncodedExamples(users, t(packed["ad_sparse"]), t(packed["ad_dense"]), t(packed["labels"]))


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the shared loop on its part of every global batch, then a report."""
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import prepare_model
    from safetensors.torch import save_file

    torch.set_num_threads(int(config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = ray.get(config["model"])
    examples = unpack_examples(ray.get(config["examples"]))
    # Every parameter of the SUM model takes part in every step; DDP's unused-parameter search stays off.
    ddp = prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False})

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    epoch_losses, steps, seconds = run_epochs(ddp, examples, config["spec"], config["train_cfg"], config["seed"],
                                              rank=rank, world_size=world, all_reduce=all_reduce)
    metrics = {"epoch_losses": epoch_losses, "steps": steps, "loop_seconds": seconds, "world_size": world}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().contiguous() for k, v in getattr(ddp, "module", ddp).state_dict().items()}
        save_file(state, str(Path(tmp) / _CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _wait_for_cpus(needed: float, timeout_s: float = 60.0) -> None:
    """Waits until the cluster has ``needed`` CPUs free (actors of an earlier stage may still be stopping).

    Raises:
        RuntimeError: not within ``timeout_s``: a trainer would wait for its workers forever. The message
            says what the cluster has and which settings size the workers.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free + 1e-9 >= needed:
            return
        if time.monotonic() > deadline:
            total = float(ray.cluster_resources().get("CPU", 0.0))
            raise RuntimeError(
                f"Ray Train needs {needed:g} CPU for its workers (train.workers x train.cpus_per_worker) but the "
                f"cluster has {free:g} of {total:g} free after {timeout_s:.0f}s (Serve's replicas hold the rest): "
                "lower train.cpus_per_worker or add a node (ray.worker_nodes)")
        time.sleep(0.5)


def train_model_ray(
    model: torch.nn.Module,
    df_train: pd.DataFrame,
    spec: FeatureSpec,
    train_cfg: Any,
    seed: int,
    *,
    workers: int,
    cpus_per_worker: float,
    storage_path: str | Path,
    threads_per_worker: int = 1,
    run_name: str = "sum-train",
    prior_init: bool = True,
) -> TrainStats:
    """Trains ``model`` in place with ``workers`` Ray Train workers (DDP); the caller is connected to Ray.

    Args:
        model: The model (fresh or warm-started); its weights are replaced by the trained ones, eval mode.
        df_train: Impressions joined with user features, with labels.
        spec: Model input spec.
        train_cfg: ``params.train`` or an equivalent mapping.
        seed: Shuffling / RNG seed (every worker draws the same order).
        workers: Ray Train workers (W >= 1).
        cpus_per_worker: Ray CPUs each worker reserves (on a 2-core stack whose Serve replicas hold CPU too,
            fractions keep the trainer from waiting for resources that never free up).
        storage_path: Ray Train's storage (run state, the checkpoint); a folder every node can read.
        threads_per_worker: torch intra-op threads per worker.
        run_name: The run's folder under ``storage_path`` (replaced: a rerun never resumes an old run; removed
            once its checkpoint is loaded).
        prior_init: Initialise a fresh model's head biases from the base rates.

    Returns:
        :class:`TrainStats` (``examples_per_second`` over all workers).

    Raises:
        ValueError: Empty frame, bad features, or a non-finite loss (as :func:`train_model`).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from safetensors.torch import load_file

    start = time.perf_counter()
    cfg = _train_config_dict(train_cfg)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _wait_for_cpus(workers * cpus_per_worker)
    examples, fresh, normalized = prepare_training(model, df_train, spec, prior_init=prior_init)
    storage = Path(storage_path).resolve()
    shutil.rmtree(storage / run_name, ignore_errors=True)
    storage.mkdir(parents=True, exist_ok=True)
    model.eval()
    refs = {"model": ray.put(model), "examples": ray.put(pack_examples(examples))}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={**refs, "spec": spec, "train_cfg": cfg, "seed": int(seed),
                           "threads": int(threads_per_worker)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=False,
                                     resources_per_worker={"CPU": float(cpus_per_worker)}),
        run_config=RunConfig(name=run_name, storage_path=str(storage)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # a worker's error comes wrapped; a diverged loss stays a ValueError
        text = str(exc)
        if "non-finite training loss" in text:
            line = next(ln for ln in text.splitlines() if "non-finite training loss" in ln)
            raise ValueError(line.split("ValueError:", 1)[-1].strip()) from exc
        raise
    metrics = result.metrics
    with result.checkpoint.as_directory() as folder:
        model.load_state_dict(load_file(str(Path(folder) / _CHECKPOINT_FILE)))
    model.eval()
    shutil.rmtree(storage / run_name, ignore_errors=True)  # the weights are the caller's now (it exports them)
    n, epochs = len(examples.labels), int(cfg["epochs"])
    losses = [float(x) for x in metrics["epoch_losses"]]
    return TrainStats(
        examples=n,
        epochs=epochs,
        steps=int(metrics["steps"]),
        final_loss=losses[-1],
        epoch_losses=tuple(losses),
        examples_per_second=n * epochs / max(float(metrics["loop_seconds"]), 1e-9),
        seconds=time.perf_counter() - start,
        fresh_model=fresh,
        normalized_features=tuple(normalized),
    )
