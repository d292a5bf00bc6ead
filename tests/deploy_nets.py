"""Networks the LCE and ONNX export tests share: briefly trained MNIST and digits networks
(cached per test session), a genotype with one layer per quantizer, and the comparison."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnas
from bnas.binarize import clip_latent_weights
from bnas.data import DataSplits, load_dataset
from bnas.genotype import loads_genotype

ROOT = Path(__file__).resolve().parents[1]
GENOTYPES = ROOT / "search_spaces" / "genotypes"
SHARED = ROOT.parent / "shared" / "data"

# Logits of an exported model agree with PyTorch's within REL_TOL of the image's largest
# |logit|: the binary sums are exact integers in every engine; what differs is float rounding
# of the scale/bias epilogue and of real layers, ~1e-7 relative. Where a binary layer's input
# lies within that rounding of zero, the two models binarize it apart (a real first layer sums
# 784 pixels in another order): such an image's logits may move by up to FLIP_TOL, and at most
# FLIP_SHARE of the images may (bnn_mlp_2048 on MNIST: 5 to 9 of 10,000, up to 0.062).
REL_TOL = 1e-4
FLIP_TOL = 0.1
FLIP_SHARE = 0.002


def mnist_root() -> Path | None:
    """Where MNIST is: $BNAS_DATA (CI sets it to shared/data), else shared/ beside the repo."""
    import os

    for root in (os.environ.get("BNAS_DATA"), SHARED):
        if root and (Path(root) / "MNIST" / "raw").is_dir():
            return Path(root)
    return None


def needs_mnist() -> pytest.MarkDecorator:
    return pytest.mark.skipif(mnist_root() is None, reason="MNIST not in $BNAS_DATA or shared/data")


@functools.cache
def dataset(name: str) -> DataSplits:
    root = mnist_root() if name == "mnist" else None
    return load_dataset(name, root, val_fraction=0.1, seed=0)


@functools.cache
def trained(genotype_name: str, dataset_name: str, steps: int, batch_size: int = 100) -> torch.nn.Module:
    """``genotype_name`` trained for ``steps`` Adam steps (brief: enough for trained weights,
    BatchNorm statistics and well above chance accuracy), in eval mode."""
    genotype = bnas.load_genotype(GENOTYPES / f"{genotype_name}.yaml")
    torch.manual_seed(0)
    model = bnas.build(genotype)
    lr = float((genotype.training or {}).get("optimizer", {}).get("lr", 1e-3))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = dataset(dataset_name)
    model.train()
    done = 0
    while done < steps:
        for x, y in data.loader("train", batch_size, shuffle=True, seed=done):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            clip_latent_weights(model)
            done += 1
            if done == steps:
                break
    return model.eval()


def held_out_images(dataset_name: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every test image of the dataset (normalised), or the first ``limit``."""
    xs, ys = [], []
    for x, y in dataset(dataset_name).loader("test", 1000):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def assert_agrees(
    model: torch.nn.Module, exported: np.ndarray, x: torch.Tensor, rel: float = REL_TOL, flip_share: float = 0.0
) -> None:
    """Same class on every image; every logit within ``rel`` of the image's largest, except on
    at most ``flip_share`` of the images, which stay within FLIP_TOL (see REL_TOL)."""
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
    assert exported.shape == ref.shape
    same = ref.argmax(1) == exported.argmax(1)
    assert same.all(), f"classes differ on {int((~same).sum())} of {len(x)} images"
    per_image = (np.abs(exported - ref) / np.abs(ref).max(1, keepdims=True)).max(1)
    beyond = int((per_image >= rel).sum())
    assert beyond <= flip_share * len(x), (
        f"{beyond} of {len(x)} images differ by more than {rel} of their largest logit"
    )
    assert per_image.max() < (FLIP_TOL if flip_share else rel), f"largest logit difference {per_image.max():.3g}"


# One layer per quantizer and binarizer: each bnas quantizer name meets its larq / ONNX form.
# (activation none: binary weights on real inputs; weight none: binary activations, real weights)
QUANTIZER_ZOO = """
name: quantizer_zoo
input: [3, 9, 9]
num_classes: 5
stem:
  - {op: conv_bn, channels: 32, kernel: 3}
body:
  - {op: conv_unit, channels: 32, binarize: {activation: ste, weight: sign}}
  - {op: conv_unit, channels: 32, order: conv_bn_act, binarize: {activation: approx_sign, weight: xnor}}
  - {op: conv_unit, channels: 48, stride: 2, binarize: {activation: swish_sign, weight: xnor_tensor}}
  - {op: conv_unit, channels: 48, order: bn_conv_bn_act, binarize: {activation: identity_ste, weight: bireal}}
  - {op: conv_unit, channels: 48, binarize: {activation: stochastic, weight: stochastic}}
  - {op: conv_unit, channels: 64, stride: 2, activation: rprelu, shortcut: true, reduction: avgpool, binarize: {activation: rsign, weight: xnor}}
  - {op: conv_unit, channels: 64, activation: prelu, binarize: {activation: ste, weight: xnor, learned_scale: true}}
  - {op: conv_unit, channels: 64, binarize: {activation: none, weight: xnor}}
  - {op: conv_unit, channels: 64, activation: relu, binarize: {activation: ste, weight: none}}
  - {op: vgg_block, channels: 64, stride: 2}
head:
  - {op: flatten}
  - {op: binary_linear, channels: 32, activation: hardtanh, binarize: {activation: rsign, weight: xnor}}
  - {op: linear}
"""


def quantizer_zoo() -> torch.nn.Module:
    """QUANTIZER_ZOO with random weights, BN statistics and thresholds (conftest.randomize)."""
    from conftest import randomize

    torch.manual_seed(0)
    return randomize(bnas.build(loads_genotype(QUANTIZER_ZOO)), seed=1)


def dyadic(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters on coarse power-of-two grids (BN without eps, one weight magnitude
    2^-j per binary output channel), so that float32 computes the network exactly in any
    order: every engine then gets the same value at every sign, ties included, and any
    difference in the logits is a mapping error, not rounding."""
    gen = torch.Generator().manual_seed(seed)

    def grid(shape: tuple[int, ...], lo: int, hi: int, step: float) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=gen).float() * step

    from bnas.binarize import BinaryConv2d, BinaryLinear

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.eps = 0.0
                m.running_var.copy_(4.0 ** torch.randint(-1, 2, (c,), generator=gen).float())
                m.running_mean.copy_(grid((c,), -4, 4, 0.25))
                if m.weight is not None:
                    m.weight.copy_(grid((c,), 1, 4, 0.25) * torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0))
                    m.bias.copy_(grid((c,), -4, 4, 0.25) + 0.125)  # off the grid of the scaled sums: no exact zeros
            elif isinstance(m, (BinaryConv2d, BinaryLinear)):
                w = m.weight
                magnitude = 2.0 ** -torch.randint(0, 4, (w.shape[0],), generator=gen).float()
                signs = torch.where(torch.rand(w.shape, generator=gen) < 0.5, -1.0, 1.0)
                w.copy_(signs * magnitude.view((-1,) + (1,) * (w.dim() - 1)))
                if m.bias is not None:
                    m.bias.copy_(grid(m.bias.shape, -4, 4, 0.25))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(grid(m.weight.shape, -2, 2, 0.5))
                if m.bias is not None:
                    m.bias.copy_(grid(m.bias.shape, -4, 4, 0.25))
    return model.eval()


def dyadic_inputs(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n, *shape), generator=gen).float() * 0.25
