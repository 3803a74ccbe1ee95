"""Data-parallel training on PyTorch's DistributedDataParallel, for every task, on top of the one loop.

One process per device (torchrun); each trains on its shard of every epoch (the sampler's `rank::world`),
DDP averages the gradients, so the weights stay identical on every rank. What DDP leaves to us:

- BatchNorm running statistics are per rank: averaged across ranks after every epoch (timm's
  `distribute_bn`), for the model and its EMA, before validation and checkpoints (SyncBatchNorm instead
  normalises with the whole batch: `trainer.sync_batchnorm=true`, CUDA only);
- freezing: DDP reduces the gradients of the parameters that required them when it was built, so a new
  wrapper is made whenever the fine-tune plan changes the trainable set (gradual unfreezing);
- evaluation: each rank scores its unpadded shard, the shards' outputs are gathered and scored together
  (Task.infer / Task.score), so the metrics are those of one process over the whole split;
- gradient accumulation: batches that do not end an update skip DDP's all-reduce (`no_sync`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from transfer import distributed
from transfer.errors import ReportedElsewhere, UserError
from transfer.tasks.base import Evaluation, Runtime, Task


class Replicated:
    """The model as the training step calls it: the model itself in one process, its DDP wrapper in several."""

    def __init__(self, model: nn.Module, device: torch.device, find_unused: bool = False) -> None:
        self.model, self.device, self.find_unused = model, device, find_unused
        self.wrapper: nn.Module = model
        self.trainable: tuple[bool, ...] = ()

    def refresh(self) -> nn.Module:
        """The module to train with; rebuilt when the trainable parameters changed (a collective: every rank
        changes plan at the same epoch)."""
        if not distributed.active():
            return self.model
        trainable = tuple(parameter.requires_grad for parameter in self.model.parameters())
        if trainable != self.trainable:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapper = self.model  # drop the old reducer's hooks before the new one registers its own
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            # no buffer syncing: BatchNorm statistics are averaged per epoch, and a mid-epoch resume restores each
            # rank's own; the weights are equal already (broadcast before training, identical updates since)
            self.wrapper = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False,
                                                   init_sync=False, find_unused_parameters=self.find_unused)
            self.trainable = trainable
        return self.wrapper

    def accumulating(self, last: bool):
        """A batch that does not end an optimizer update keeps its gradients local."""
        if last or self.wrapper is self.model:
            return contextlib.nullcontext()
        return self.wrapper.no_sync()


def average_batchnorm(*models: nn.Module | None) -> None:
    """Every rank's BatchNorm running mean and variance replaced by their average across ranks."""
    if not distributed.active():
        return
    from timm.utils import distribute_bn

    for model in models:
        if model is not None:
            distribute_bn(model, distributed.world_size(), reduce=True)


def broadcast_weights(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the best weights, which rank 0 loaded)."""
    if not distributed.active():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def evaluate(task: Task, model: nn.Module, loader, runtime: Runtime) -> Evaluation:
    """The split's metrics from every rank's shard (unpadded), equal to one process's pass over all of it."""
    return task.score(distributed.gather(task.infer(model, loader, runtime)))


def sync_batchnorm(model: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """trainer.sync_batchnorm: BatchNorms that normalise with the statistics of every rank's batch."""
    if not enabled:
        return model
    if device.type != "cuda":
        raise UserError("trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm); on CPU the "
                        "running statistics are averaged across processes after every epoch instead.")
    if not distributed.launched():
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def agree(error: UserError | None) -> None:
    """Raise, on every rank, the first user error any rank met (rank 0 prints it once), or return."""
    messages = distributed.gather(str(error) if error is not None else None)
    first = next(((rank, message) for rank, message in enumerate(messages) if message is not None), None)
    if first is None:
        return
    if not distributed.is_main():
        raise ReportedElsewhere("")
    if error is not None:
        raise error
    raise UserError(f"(in process {first[0]}) {first[1]}")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank is gone (killed, crashed, unreachable)."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in signs)
