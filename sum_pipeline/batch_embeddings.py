"""The daily batch embeddings as a Ray Data pipeline (``inference.engine: ray_data``).

The day's users partition in blocks (``from_arrow``) -> ``map_batches`` over an actor pool, each actor holding the
production snapshot's user tower (loaded once per actor, not once per batch) -> batches of ``(user ids,
fp16 [B, K, D])`` streamed back to the caller, which writes them through the one store writer
(:func:`serving.store_io.write_embeddings`) as the in-task path does. The tower call is the in-task path's
(:func:`sum_models.snapshot.embed_users_finite`), so both paths compute the same values and skip the same users.

The actors read the snapshot folder by path: on several hosts it must be on storage every node mounts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["TowerEmbedder", "embed_with_ray_data"]


class TowerEmbedder:
    """A Ray Data actor: the snapshot's user tower, applied to batches of users.

    Args:
        snapshot_dir: The snapshot folder (``user_tower.safetensors`` + config).
        batch_size: Users per tower call inside a batch.
    """

    def __init__(self, snapshot_dir: str, batch_size: int) -> None:
        import torch

        from sum_models.snapshot import load_user_tower

        torch.set_num_threads(1)
        self.tower, _ = load_user_tower(Path(snapshot_dir))
        self.tower.eval()
        self.batch_size = int(batch_size)

    def __call__(self, batch):
        """``users`` (pandas, one row per user) -> ``{"user_id": int64 [B], "embedding": fp16 [B, K*D], "skipped":
        str [B]}`` (``skipped``: ``""`` or why the user has no embedding, see
        :func:`sum_models.snapshot.embed_users_finite`: one bad row does not fail its batch)."""
        from sum_models.snapshot import embed_users_finite

        emb, skipped = embed_users_finite(self.tower, batch, self.tower.spec, batch_size=self.batch_size)
        return {"user_id": batch["user_id"].to_numpy(dtype=np.int64), "embedding": emb.reshape(len(emb), emb.shape[1] * emb.shape[2]),
                "skipped": skipped.astype(str)}


def embed_with_ray_data(
    users_dir: Path, snapshot_dir: Path, shape: tuple[int, int], *, batch_size: int, actors: int,
    cpus_per_actor: float,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Embeds every user of a users partition on the connected Ray cluster.

    Args:
        users_dir: The day's users partition (parquet files).
        snapshot_dir: The production snapshot.
        shape: ``(K, D)`` of the tower's output.
        batch_size: Users per batch (and per tower call).
        actors: Actors in the pool.
        cpus_per_actor: Ray CPUs each actor reserves.

    Yields:
        ``(user_ids int64 [B], embeddings fp16 [B, K, D], skipped str [B])`` per batch, in no particular order
        (``skipped``: ``""`` for a computed user, else the reason; its embedding is NaN).
    """
    import ray.data

    import pyarrow as pa
    import pyarrow.parquet as pq

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the task log gets one line per batch written instead
    files = sorted(str(p) for p in Path(users_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {users_dir}")
    # Not ray.data.read_parquet: its file-listing tasks reserve a whole CPU each, with no knob in Ray 2.60, and
    # beside Serve's replicas and the actor pool on the 2-CPU stack they never get scheduled (the pipeline
    # hung). The partition (one row per user) is read here into blocks of batch_size rows instead.
    # In user-id order, in blocks of batch_size: the in-task path's batches exactly, so the tower computes the
    # same sums in the same order (a GEMM's result depends on its batch's rows in the last bit).
    table = pa.concat_tables([pq.ParquetFile(f).read() for f in files]).sort_by("user_id")
    blocks = [table.slice(lo, batch_size) for lo in range(0, table.num_rows, batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        TowerEmbedder, fn_constructor_kwargs={"snapshot_dir": str(snapshot_dir), "batch_size": batch_size},
        batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=int(actors)),
        num_cpus=float(cpus_per_actor),
    )
    k, d = shape
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids: Any = batch["user_id"]
        yield (np.asarray(ids, dtype=np.int64), np.asarray(batch["embedding"], dtype=np.float16).reshape(len(ids), k, d),
               np.asarray(batch["skipped"], dtype=object))
