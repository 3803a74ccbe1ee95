"""Evaluation runs a BatchNorm-folded copy of the model that is built once and refolded from the model's current
weights at every evaluation (a run evaluates after each epoch), never a stale one."""

from __future__ import annotations

import timm
import torch

from transfer.models.inference import checked_fold, fold_batchnorm, same_outputs


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=4).to(memory_format=torch.channels_last).eval()


def images(count: int = 8) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)


def train_a_little(model: torch.nn.Module) -> None:
    """Two SGD steps in train mode: the weights and the BatchNorm running statistics change."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.enable_grad():  # the tests run under no_grad
        for _ in range(2):
            optimizer.zero_grad()
            model(images(16) * 3 + 1).logsumexp(1).mean().backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def test_the_folded_copy_is_reused_and_follows_the_training() -> None:
    model = small_model()
    folded = fold_batchnorm(model)
    assert folded is not None and same_outputs(folded(images()), model(images()))
    before = model(images())
    train_a_little(model)
    again = fold_batchnorm(model)
    assert again is folded  # no copy per evaluation
    after = model(images())
    assert not torch.allclose(before, after, atol=1e-3)  # training moved the outputs…
    assert same_outputs(again(images()), after)  # …and the reused copy moved with them


@torch.no_grad()
def test_a_changed_model_gets_a_new_copy() -> None:
    model = small_model()
    folded = fold_batchnorm(model)
    model.reset_classifier(7)
    model.eval()
    rebuilt = fold_batchnorm(model)
    assert rebuilt is not folded and rebuilt(images()).shape == (8, 7)
    assert same_outputs(rebuilt(images()), model(images()))


@torch.no_grad()
def test_checked_fold_runs_the_copy_only_when_it_matches() -> None:
    model = small_model()
    assert checked_fold(model, images()) is fold_batchnorm(model)
    model.train()
    assert checked_fold(model, images()) is model  # training mode: nothing folds
