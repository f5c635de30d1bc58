"""Sharding `sana generate` over the processes torchrun starts: which images a rank makes, and on which device.

`torchrun --nproc-per-node K -m sana generate ...` sets RANK / WORLD_SIZE / LOCAL_RANK. Every image has its own
seed (seed + i) and its own generator, so the images are independent: rank r makes the images whose global
index i has i % K == r, with no process group and no communication, and names them as one process would.
Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sana.errors import UserError


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """This process's place among the ones torchrun started; a single process without those variables."""
    env = os.environ if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}")
    return Launch(rank, world_size, local_rank)


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The global image indices rank `rank` of `world_size` makes: i % world_size == rank (round robin, so
    the ranks' shares differ by at most one image)."""
    return list(range(rank, n, world_size))


def rank_device(device: str, launch: Launch) -> str:
    """Each rank's own device: a bare `cuda` becomes `cuda:LOCAL_RANK` under torchrun; an explicit index
    (`cuda:1`), `cpu` and the rest stay as given."""
    return f"cuda:{launch.local_rank}" if launch.distributed and device == "cuda" else device


def batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """`indices` in consecutive chunks of at most `size`."""
    return [list(indices[k : k + size]) for k in range(0, len(indices), size)]
