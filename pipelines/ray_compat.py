"""The one place that speaks Ray Data's fast-moving API (anchors.md: `concurrency=` vs
`compute=` flipped twice). If Ray changes it again, this file changes, nothing else."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy, Dataset


@dataclass(frozen=True)
class PoolSettings:
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0     # 1 on GPU clusters: one compressor per GPU
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.num_gpus < 0 or self.num_cpus <= 0:
            raise ValueError(f"num_gpus must be >= 0 and num_cpus > 0, got {self.num_gpus}, {self.num_cpus}")


def map_with_actor_pool(ds: Dataset, actor_class: type, constructor_args: tuple, pool: PoolSettings,
                        batch_size: int) -> Dataset:
    """ds.map_batches over a pool of stateful actors (each loads the model once)."""
    return ds.map_batches(
        actor_class,
        fn_constructor_args=constructor_args,
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_gpus=pool.num_gpus,
        num_cpus=pool.num_cpus,
    )


def map_with_tasks(ds: Dataset, fn, fn_args: tuple, batch_size: int, num_cpus: float = 1.0) -> Dataset:
    return ds.map_batches(fn, fn_args=fn_args, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus)


def init_ray(address: str | None) -> None:
    """Connect to `address` (or RAY_ADDRESS, as under `ray job submit`), else start a local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
