"""Fine-tune strategies: which parameters train in which epoch, and which modules stay in eval mode.

`finetune.strategy`:
  full                  every parameter trains from the first epoch
  linear_probe          only the classifier head trains, the whole run
  freeze_then_unfreeze  the head alone for `finetune.head_epochs` (with its own `head_lr` and
                        `head_warmup_epochs`), then everything with optim.lr and the schedule's warmup
  gradual               fastai's gradual unfreezing (`freeze_to`): the head first, then one more of timm's
                        coarse parameter groups (`model.group_matcher(coarse=True)`: stem, stages, head)
                        every `finetune.unfreeze_every` epochs, from the top down; one schedule throughout

`finetune.bn` is the BatchNorm policy for the parts that train: `train` (statistics follow the new data),
`freeze_stats` (running statistics fixed, affine weights train) or `frozen` (statistics and affine weights
fixed). A frozen part always keeps its BatchNorm statistics: `model.train()` would otherwise keep updating
running means from the new data and silently change the "frozen" features.

The optimizer holds every parameter from the start (timm's factories leave out parameters that do not
require grad, so it is built with all of them trainable); a frozen parameter has no gradient, and torch's
optimizers skip it, weight decay included. One optimizer for the whole run keeps resume exact across
phases: the phase is a function of the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from transfer.config import require

STRATEGIES = ("full", "linear_probe", "freeze_then_unfreeze", "gradual")
BN_POLICIES = ("train", "freeze_stats", "frozen")


@dataclass(frozen=True)
class Phase:
    """Epochs [start, end) with one learning-rate schedule; lr/warmup None take optim.lr / the schedule's."""

    start: int
    end: int
    lr: float | None = None
    warmup_epochs: float | None = None


class Plan:
    """What trains when, for one model and one run length."""

    def __init__(self, model: nn.Module, strategy: str = "full", epochs: int = 1, bn: str = "train",
                 head_epochs: int = 1, head_lr: float | None = None, head_warmup_epochs: float | None = 0,
                 unfreeze_every: int = 1) -> None:
        require(strategy, STRATEGIES, "finetune.strategy")
        require(bn, BN_POLICIES, "finetune.bn")
        self.strategy, self.epochs, self.bn = strategy, max(int(epochs), 1), bn
        self.head_epochs, self.unfreeze_every = int(head_epochs), max(int(unfreeze_every), 1)
        self.groups = parameter_groups(model)
        self.head = {name for name in self.groups[-1]}
        if strategy == "freeze_then_unfreeze" and 0 < self.head_epochs < self.epochs:
            self.phases = [Phase(0, self.head_epochs, head_lr, head_warmup_epochs),
                           Phase(self.head_epochs, self.epochs)]
        elif strategy == "freeze_then_unfreeze" and self.head_epochs >= self.epochs:
            self.phases = [Phase(0, self.epochs, head_lr, head_warmup_epochs)]
        else:
            self.phases = [Phase(0, self.epochs)]
        self.norm_parameters = {f"{prefix}.{name}" if prefix else name
                                for prefix, module in model.named_modules() if is_batchnorm(module)
                                for name, _ in module.named_parameters(recurse=False)}

    def phase(self, epoch: int) -> int:
        """Index of the phase that epoch (0-based) belongs to; epochs past the end belong to the last."""
        return next((i for i, p in enumerate(self.phases) if epoch < p.end), len(self.phases) - 1)

    def trained_groups(self, epoch: int) -> int:
        """How many parameter groups, counted from the head down, train in this epoch."""
        if self.strategy == "full" or (self.strategy == "freeze_then_unfreeze" and epoch >= self.head_epochs):
            return len(self.groups)
        if self.strategy == "gradual":
            return min(1 + epoch // self.unfreeze_every, len(self.groups))
        return 1

    def trainable(self, epoch: int) -> set[str]:
        """Names of the parameters that train in this epoch."""
        names = {name for group in self.groups[len(self.groups) - self.trained_groups(epoch):] for name in group}
        return names - self.norm_parameters if self.bn == "frozen" else names

    def enter(self, model: nn.Module, epoch: int) -> None:
        """requires_grad and train/eval modes for this epoch (called before each epoch's first step)."""
        trainable = self.trainable(epoch)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name in trainable
        set_modes(model, self.head, self.bn)

    @contextmanager
    def all_trainable(self, model: nn.Module) -> Iterator[None]:
        """Every parameter requires grad inside (for timm's optimizer factory), as before afterwards."""
        before = {name: p.requires_grad for name, p in model.named_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad = True
        try:
            yield
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad = before[name]


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names in timm's coarse groups (stem, stages, …), input side first; the classifier is the
    last group. Models without a group_matcher get two groups: everything else, then the classifier."""
    head = {f"{head_prefix(model)}{name}" for name, _ in model.get_classifier().named_parameters()}
    groups: list[list[str]] = []
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[n for n in names if n not in head] for _, names in sorted(grouped.items())]
    else:
        groups = [[name for name, _ in model.named_parameters() if name not in head]]
    groups = [group for group in groups if group]
    return groups + [sorted(head)]


def head_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return f"{name}." if name else ""
    return ""


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def set_modes(model: nn.Module, head: set[str], bn: str = "train") -> None:
    """Train mode where parameters train; eval mode (BatchNorm statistics, dropout, drop-path) elsewhere.

    When only the head trains the whole body runs in eval mode, as a fixed feature extractor."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if trainable <= head:
        model.eval()
        model.get_classifier().train()
        return
    model.train()
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()
        elif bn != "train" and is_batchnorm(module):
            module.eval()


def apply_strategy(model: nn.Module, finetune: str | Mapping, epochs: int = 1) -> Plan:
    """The run's Plan from `finetune` (the config section, or a strategy name), applied for epoch 0."""
    settings = {"strategy": finetune} if isinstance(finetune, str) else dict(finetune)
    plan = Plan(model, epochs=epochs, **settings)
    plan.enter(model, 0)
    return plan


def set_train_mode(model: nn.Module, strategy: str | Plan, epoch: int = 0) -> None:
    """Parameters and modes for this epoch; a bare strategy name means its first epoch."""
    plan = strategy if isinstance(strategy, Plan) else Plan(model, strategy)
    plan.enter(model, epoch)
