"""The processes of one run: PyTorch's own distributed stack, started by torchrun (or by `trainer.processes`).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous; `start()` joins the process group (gloo for
CPU tensors, nccl for CUDA ones) and everything else here is a no-op in a single process, so the engine reads
the same either way. torch is imported inside the functions: the CLI reads rank facts before torch loads.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

TIMEOUT = timedelta(minutes=10)  # a collective waits this long for a rank that hangs (a dead one fails at once)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """This process is one of several started by torchrun."""
    return world_size() > 1


def active() -> bool:
    """The process group is up (a multi-process run past `start()`)."""
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def start() -> None:
    """Join the process group torchrun's environment describes (once)."""
    if not launched() or active():
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        # NCCL needs a GPU per process; more processes than GPUs on a machine share them over gloo (slower)
        backend = "gloo" if local_world_size() > torch.cuda.device_count() else "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def stop() -> None:
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()


def broadcast(value: Any, source: int = 0) -> Any:
    """`value` as rank `source` has it (picklable objects), on every rank."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(*flags: bool, device=None) -> list[bool]:
    """For each flag: whether it is true on any rank (one small all-reduce)."""
    if not active():
        return list(flags)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def sum_over_ranks(values: list[float], device=None) -> list[float]:
    """Elementwise sums of per-rank numbers (float64 on the way, so counts stay exact)."""
    if not active():
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def shard(size: int) -> range:
    """This rank's share of `size` evaluation samples: every world_size-th from its rank, none padded, so
    the shards together are the split exactly once."""
    return range(rank(), size, world_size())
