"""Models: SmallCNN, ResNet18 (CIFAR stem, spectral norm, DropBlock), LitClassifier and accuracy()."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from dropblock import DropBlock2D
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from larex.models.classifier import LitClassifier, accuracy
from larex.models.resnet import BasicBlock, ResNet18
from larex.models.small_cnn import SmallCNN


def _quadrant_data(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 linearly separable classes: a bright patch in quadrant y of a noisy 1-channel image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    h = size // 2
    for q in range(4):  # loop over the 4 classes, not over samples
        r, c = divmod(q, 2)
        x[y == q, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.0
    return x, y


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32), (1, 16)])
def test_small_cnn_shapes_and_paths(in_channels, size):
    model = SmallCNN(in_channels=in_channels, num_classes=8, width=8).eval()
    x = torch.randn(3, in_channels, size, size)
    assert model(x).shape == (3, 8)
    names = dict(model.named_modules())
    for path in ("block1", "block2", "dropblock", "block3", "fc"):
        assert path in names
    assert isinstance(model.dropblock, DropBlock2D)
    assert model.fc.in_features == 4 * 8
    feats = model.block3(model.dropblock(model.block2(model.block1(x))))
    assert feats.shape == (3, 32, size // 4, size // 4)


def test_small_cnn_default_size_is_small():
    n = sum(p.numel() for p in SmallCNN().parameters())
    # conv 1->32, 32->64, 64->128, 128->128 (3x3, no bias) + 4 BN + fc 128->8
    expected = 9 * (32 + 32 * 64 + 64 * 128 + 128 * 128) + 2 * (32 + 64 + 128 + 128) + 128 * 8 + 8
    assert n == expected < 300_000


def test_resnet18_shapes_paths_and_param_count():
    model = ResNet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    # CIFAR ResNet-18 (3x3 stem, 1x1-conv projection shortcuts): the well-known 11,173,962 parameters
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    names = dict(model.named_modules())
    for path in ("layer1", "layer2", "layer3", "layer4", "dropblock", "fc", "layer3.1.conv2"):
        assert path in names
    assert "dropout" not in names  # dropout_prob=0 -> no dropout layer
    shapes = {}
    handles = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
               for n in ("layer1", "layer2", "layer3", "dropblock", "layer4")]
    model(x)
    for h in handles:
        h.remove()
    assert shapes == {"layer1": (2, 64, 32, 32), "layer2": (2, 128, 16, 16), "layer3": (2, 256, 8, 8),
                      "dropblock": (2, 256, 8, 8), "layer4": (2, 512, 4, 4)}


def test_resnet18_dropblock_placement_and_dropout():
    model = ResNet18(num_classes=5, in_channels=1, dropblock_after="layer2", dropblock_prob=0.2, dropout_prob=0.3)
    assert model.dropblock.drop_prob == 0.2 and isinstance(model.dropout, nn.Dropout)
    seen = []
    model.dropblock.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert seen == [(2, 128, 16, 16)]  # runs on the layer2 output
    assert "dropblock" not in dict(ResNet18(dropblock_after=None).named_modules())
    with pytest.raises(ValueError, match="layer5"):
        ResNet18(dropblock_after="layer5")


def test_resnet18_spectral_norm():
    torch.manual_seed(0)
    model = ResNet18(spectral_norm=True).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for conv in convs:
        assert hasattr(conv, "parametrizations") and "weight" in conv.parametrizations
    for conv in (model.conv1, model.layer1[0].conv2, model.layer2[0].shortcut[0]):  # small ones: SVD is cheap
        w = conv.weight.detach()
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
        assert 0.99 < float(sigma) < 1.05  # power-iteration estimate of the top singular value is ~1
    assert not hasattr(model.fc, "parametrizations")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_training_lowers_loss():
    torch.manual_seed(0)
    x, y = _quadrant_data(256)
    model = SmallCNN(in_channels=1, num_classes=4, width=8, drop_prob=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert accuracy(model, [(x, y)], "cpu") > 0.9


def test_lit_classifier_one_epoch_logs_val_acc():
    torch.manual_seed(0)
    x, y = _quadrant_data(256)
    train = DataLoader(TensorDataset(x, y, torch.arange(256)), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=40)
    lit = LitClassifier(SmallCNN(in_channels=1, num_classes=4, width=8), lr=0.01, epochs=1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, train, val)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    # the epoch-level val/acc is the sample-weighted mean over batches = accuracy over all val samples
    assert float(metrics["val/acc"]) == pytest.approx(accuracy(lit.model, val, "cpu"), abs=1e-6)
    with torch.no_grad():
        logits = torch.cat([lit.model.eval()(xb) for xb, _ in val])
    assert float(metrics["val/loss"]) == pytest.approx(float(F.cross_entropy(logits, y[:96])), rel=1e-5)
    # per-step cosine schedule: 8 steps, annealed to 0 at the end
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_lit_classifier_optimizers_and_bad_args():
    model = SmallCNN(width=4)
    opt = LitClassifier(model, optimizer="sgd", momentum=0.8, lr=0.1, scheduler=None).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    cfg = LitClassifier(model, optimizer="adamw", epochs=3).configure_optimizers()  # no trainer attached
    assert isinstance(cfg["optimizer"], torch.optim.AdamW)
    assert cfg["lr_scheduler"]["interval"] == "epoch" and cfg["lr_scheduler"]["scheduler"].T_max == 3
    with pytest.raises(ValueError, match="rmsprop"):
        LitClassifier(model, optimizer="rmsprop")
    with pytest.raises(ValueError, match="scheduler"):
        LitClassifier(model, scheduler="step")


def test_accuracy_matches_numpy_and_restores_mode():
    lin = nn.Linear(3, 4)
    x = torch.randn(50, 3)
    y = torch.randint(0, 4, (50,))
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    expected = float(np.mean((x.numpy() @ w.T + b).argmax(1) == y.numpy()))
    model = nn.Sequential(lin, nn.Dropout(0.9)).train()
    loader = [(x[:20], y[:20], torch.arange(20)), (x[20:], y[20:], torch.arange(20, 50))]
    assert accuracy(model, loader, "cpu") == pytest.approx(expected)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="empty"):
        accuracy(model, [], "cpu")
