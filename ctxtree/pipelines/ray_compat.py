"""The one place that speaks Ray Data's fast-moving API (anchors.md: `concurrency=` vs
`compute=` flipped twice). If Ray changes it again, this file changes, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from ctxtree import ray_session


# CPU shares of the light stages. Reading and tokenizing hold a slot while they stream;
# with whole CPUs each, a 2-core node running one compressor actor deadlocks (a blocked
# read task holds the CPU the tokenizer needs). Small shares leave room for the actor.
READ_CPUS = 0.25
PREPARE_CPUS = 0.25
# Ray Data coalesces a task's outputs into blocks of up to 128 MiB by default: a whole
# corpus of token ids would then travel (and finish, and be retried) as one block, and
# the driver would hear of no document until the last. Small blocks stream documents
# through the stages a few at a time (a 16K-token document is 64 KiB of ids).
BLOCK_BYTES = 64 * 1024


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


def map_with_tasks(ds: Dataset, fn, fn_args: tuple, batch_size: int | None, num_cpus: float) -> Dataset:
    """ds.map_batches with stateless tasks. Resources unlike the actor pool's keep Ray
    from fusing the two stages, so tokenizing never occupies a (GPU) compressor."""
    return ds.map_batches(fn, fn_args=fn_args, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus)


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """ctxtree.ray_session.init_ray, with Ray Data's block size set for this process."""
    DataContext.get_current().target_max_block_size = BLOCK_BYTES
    ray_session.init_ray(address, dashboard)
