"""`torchrun --nproc_per_node K -m bench run ...`: the protocol sharded over K processes.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT); with WORLD_SIZE > 1,
`init` joins the process group (gloo on CPU, nccl on CUDA, one GPU per process: cuda:LOCAL_RANK).

Sharding is by whole batches: the batches of a single-process run (indices start..start+B-1 for
start = 0, B, 2B, ...) are dealt round-robin, batch j to rank j % K. Every sample is therefore drawn,
decoded and featurised in exactly the batch it would be in without torchrun, so a sharded run gives
the same numbers as a single process bit for bit, not merely up to float rounding between batch
sizes. Rank 0 gathers the features (and the sample-grid images) in index order, computes the metrics
and the timing (on its own device), and writes the results; the other ranks write nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from .errors import BenchError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def my_batches(self, starts) -> list[int]:
        """This rank's share of the batch start indices of a single-process run."""
        return list(starts)[self.rank::self.world_size]

    def device(self, device: str) -> str:
        """One GPU per process: 'cuda' becomes cuda:LOCAL_RANK under torchrun."""
        return f"cuda:{self.local_rank}" if self.sharded and device == "cuda" else device


SINGLE = Dist()


def _env_int(name: str, default: int | None, low: int, high: int | None = None) -> int:
    """An integer torchrun sets, in low..high; default where it is unset (None: it must be set)."""
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise BenchError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for several processes, but {name} is "
                             f"not set; start them with torchrun, which sets it")
        return default
    try:
        number = int(value)
    except ValueError:
        raise BenchError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None
    if number < low or (high is not None and number > high):
        raise BenchError(f"environment variable {name}={number} is outside {low}..{'' if high is None else high} "
                         f"(set by torchrun)")
    return number


def from_env() -> Dist:
    """Rank and world size as torchrun sets them, checked; a single process without them."""
    world = _env_int("WORLD_SIZE", 1, 1)
    if world == 1:
        return SINGLE
    rank = _env_int("RANK", None, 0, world - 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world, 1, world)
    local = _env_int("LOCAL_RANK", 0, 0, local_world - 1)
    # the env:// rendezvous of init_process_group reads these two
    if not os.environ.get("MASTER_ADDR"):
        raise BenchError(f"WORLD_SIZE={world} asks for several processes, but MASTER_ADDR is not set; "
                         f"start them with torchrun, which sets it")
    _env_int("MASTER_PORT", None, 1, 65535)
    return Dist(rank, world, local)


def init(device: str) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); SINGLE otherwise."""
    ctx = from_env()
    if not ctx.sharded:
        return ctx
    import torch
    import torch.distributed as dist
    if not dist.is_available():
        raise BenchError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(ctx.local_rank)
        # rank 0 alone computes the reference features and the held-out rows while the others wait
        # at the next gather: allow hours, not the default 30 minutes
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=6))
    return ctx


def barrier(ctx: Dist) -> None:
    if ctx.sharded:
        import torch.distributed as dist
        dist.barrier()


def finish(ctx: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if not ctx.sharded:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_in_order(ctx: Dist, indices: np.ndarray, feats: np.ndarray, grid: dict):
    """Rank 0 -> (features of all ranks ordered by sample index, grid dict of all ranks); others (None, None).
    indices: the sample index of each row of feats on this rank; grid: index -> image."""
    if not ctx.sharded:
        return feats, grid
    import torch.distributed as dist
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object((np.asarray(indices, dtype=np.int64), feats, grid), parts, dst=0)
    if not ctx.is_main:
        return None, None
    all_idx = np.concatenate([p[0] for p in parts])
    all_feats = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_idx, kind="stable")
    if not np.array_equal(all_idx[order], np.arange(len(all_idx))):
        raise BenchError(f"internal: the ranks' shards do not cover the samples 0..{len(all_idx) - 1} once each")
    merged = {}
    for p in parts:
        merged.update(p[2])
    return all_feats[order], merged
