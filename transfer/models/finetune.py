"""Fine-tune strategies: which parameters train and which modules stay in eval mode.

A frozen backbone must also keep its BatchNorm statistics frozen: `model.train()` would otherwise
keep updating running means from the new data and silently change the "frozen" features.
"""

from __future__ import annotations

from torch import nn

STRATEGIES = ("full", "linear_probe")


def apply_strategy(model: nn.Module, strategy: str) -> None:
    """Set requires_grad for the strategy (the head always trains)."""
    head = model.get_classifier()
    for parameter in model.parameters():
        parameter.requires_grad = strategy == "full"
    for parameter in head.parameters():
        parameter.requires_grad = True


def set_train_mode(model: nn.Module, strategy: str) -> None:
    """model.train(), except that a frozen backbone stays in eval mode (BatchNorm, dropout)."""
    if strategy == "full":
        model.train()
        return
    model.eval()
    model.get_classifier().train()
