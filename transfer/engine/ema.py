"""The weight EMA: timm's `ModelEmaV3`, updated after every optimizer update, for every task.

Short fine-tunes have few updates, so by default its warmup ramps the decay (1 - (1 + step)^-power, capped
at `ema.decay`) instead of averaging in the random-init-like early weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.utils import ModelEmaV3
from torch import nn

from transfer.checkpoint import unwrapped
from transfer.errors import UserError


class Ema:
    """timm's ModelEmaV3 of the model's weights, updated after every optimizer update."""

    def __init__(self, model: nn.Module, decay: float = 0.998, use_warmup: bool = True, warmup_power: float = 0.75,
                 warmup_gamma: float = 1.0) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"ema.decay={decay} must lie between 0 and 1, e.g. ema.decay=0.998.")
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=use_warmup, warmup_power=warmup_power,
                              warmup_gamma=warmup_gamma)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(model, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(unwrapped(dict(state)))
