"""Export a network trained with `bnas eval` and compare the packed model with it on every
MNIST test image: same predicted class, largest relative logit difference, file sizes, and
where the two disagree on the sign of a binary layer's input (and how close to zero the
trained model's value was there: flips within float rounding of zero are the expected cause
of logit differences, since the packed model folds BatchNorm and computes in a new order).
Classes and logits come from the packed model as it runs (its fused plan); the binary-layer
inputs are traced on its module tree (the same layers, run one by one).

    python scripts/check_packed_mnist.py GENOTYPE.yaml RUN_DIR [--data-root P]
        [--dataset mnist] [--stem-precision float32|int8] [--shortcut-precision float32|int8]
        [--head-precision float32|int8] [--input-grid]

``--dataset`` takes another test set (``fashion_mnist``, ``digits``, ...); ``--stem-precision
int8`` runs the packed model's stem in 8-bit integers (``PackedNetwork.stem_precision``), so the
count says how often that changes a prediction; for scale, the script then also counts how
often the trained model itself changes its prediction when each image gets uniform noise of
plus or minus half its int8 quantization step (seeded), an error of the same size, and how often
it does so with the weights of its convs on the image (those the int8 stem runs) rounded per
output channel to 8, 12 and 16 bits, the image exact: how finely the network must compute its
first layer to keep every class.
``--input-grid`` has the int8 stem quantize each image on the dataset's pixel grid
(``PackedNetwork.input_grid = bnas.kernels.int8.pixel_grid(mean, std, levels)``: each pixel to
itself; 255 levels for 8-bit images, 16 for the digits) instead of by its own range. ``--shortcut-precision int8`` runs the 1x1 shortcut convs in 8-bit
integers too
(``PackedNetwork.shortcut_precision``), ``--head-precision int8`` the classifier
(``PackedNetwork.head_precision``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import bnas
from bnas.binarize import BinaryConv2d, BinaryLinear, sign
from bnas.data import load_dataset
from bnas.export import PackedConv2d, PackedLinear, SignConv2d, SignLinear, _as_channel_view
from bnas.export.plan import KernelLinear
from bnas.kernels.dispatch import POINTWISE_PRECISIONS, STEM_PRECISIONS
from bnas.kernels.int8 import image_quantization, pixel_grid, quantize_weights
from bnas.train import load_checkpoint

_PACKED_TYPES = (PackedConv2d, PackedLinear, SignConv2d, SignLinear)


def _sign_inputs(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list]:
    """Hooks that keep, for every layer with binary activations (by path), the value whose
    sign the layer takes: its input less the learnt threshold where it has one."""
    seen: dict[str, torch.Tensor] = {}
    paths, handles = [], []

    def keep(path: str, threshold: torch.Tensor | None):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if threshold is not None:
                x = x - _as_channel_view(threshold.detach(), x.dim())
            seen[path] = x

        return hook

    for path, layer in model.named_modules():
        if isinstance(layer, (BinaryConv2d, BinaryLinear)) and layer.input_quantizer.name != "none":
            threshold = getattr(layer.input_quantizer, "threshold", None)
        elif isinstance(layer, _PACKED_TYPES):
            threshold = layer.threshold
        else:
            continue
        paths.append(path)
        handles.append(layer.register_forward_pre_hook(keep(path, threshold)))
    return seen, paths, handles


#: the weight precisions, in bits, of the "for scale" count with rounded image-conv weights
WEIGHT_BITS = (8, 12, 16)


def _image_convs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.nn.Conv2d]:
    """The float convs of ``model`` that read the image ``x`` itself (those the int8 stem runs)."""
    found: list[torch.nn.Conv2d] = []

    def note(module: torch.nn.Module, args: tuple) -> None:
        if args[0] is x and isinstance(module, torch.nn.Conv2d):
            found.append(module)

    handles = [m.register_forward_pre_hook(note) for m in model.modules() if type(m) is torch.nn.Conv2d]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def _same_with_rounded_image_convs(model: torch.nn.Module, data) -> tuple[list[int], int]:
    """(for each of WEIGHT_BITS, the images on which ``model`` keeps its class when the weights
    of its image convs are rounded per output channel to that many bits by the int8 stem's rule,
    ``bnas.kernels.int8.quantize_weights``; how many such convs it has). The weights are put
    back afterwards."""
    same = [0] * len(WEIGHT_BITS)
    batches = data.loader("test", 1000)
    convs = _image_convs(model, next(iter(batches))[0])
    kept = [c.weight.detach().clone() for c in convs]
    rounded = [[_dequantized(w, bits) for w in kept] for bits in WEIGHT_BITS]
    with torch.no_grad():
        try:
            for x, _ in batches:
                for c, w in zip(convs, kept, strict=True):
                    c.weight.copy_(w)
                expected = model(x).argmax(1)
                for i, weights in enumerate(rounded):
                    for c, w in zip(convs, weights, strict=True):
                        c.weight.copy_(w)
                    same[i] += (model(x).argmax(1) == expected).sum().item()
        finally:
            for c, w in zip(convs, kept, strict=True):
                c.weight.copy_(w)
    return same, len(convs)


def _dequantized(weight: torch.Tensor, bits: int) -> torch.Tensor:
    wq, scale = quantize_weights(weight, bits)
    return wq.float() * scale.view(-1, 1, 1, 1)


def _pixel_levels(images: torch.Tensor) -> int:
    """How many levels above 0 the dataset's pixels take: 255 for 8-bit images, else the fewest
    (up to 255) on which every pixel of its [0, 1] scale is whole (the digits': 16)."""
    if images.dtype == torch.uint8:
        return 255
    values = images.float()
    for levels in range(1, 256):
        if torch.equal(torch.round(values * levels), values * levels):
            return levels
    raise SystemExit("--input-grid: this dataset's pixels lie on no grid of up to 255 levels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genotype")
    parser.add_argument("run", help="folder of a `bnas eval` run (holds model.pt)")
    parser.add_argument("--data-root")
    parser.add_argument("--dataset", default="mnist", help="the test set (default mnist)")
    parser.add_argument("--stem-precision", choices=STEM_PRECISIONS, default="float32")
    parser.add_argument("--shortcut-precision", choices=POINTWISE_PRECISIONS, default="float32")
    parser.add_argument("--head-precision", choices=POINTWISE_PRECISIONS, default="float32")
    parser.add_argument(
        "--input-grid", action="store_true", help="the int8 stem quantizes on the test set's pixel grid"
    )
    args = parser.parse_args()
    genotype = bnas.load_genotype(args.genotype)
    weights = Path(args.run) / "model.pt"
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = Path(tmp) / "model.bnas"
        subprocess.run(
            [sys.executable, "-m", "bnas", "export", args.genotype, str(weights), "--out", str(packed_path)], check=True
        )
        model = bnas.build(genotype)
        model.load_state_dict(load_checkpoint(weights, advice="pass the folder of a finished `bnas eval` run"))
        model.eval()
        packed = bnas.load_packed(packed_path)
        packed.stem_precision = args.stem_precision
        packed.shortcut_precision = args.shortcut_precision
        packed.head_precision = args.head_precision
        data = load_dataset(args.dataset, args.data_root)
        if args.input_grid:
            packed.input_grid = pixel_grid(data.mean, data.std, _pixel_levels(data.train_x))
        plan = packed.plan()
        heads = [m.precision for m in plan.modules() if isinstance(m, KernelLinear)] if plan is not None else []
        head_kept_float = args.head_precision == "int8" and bool(heads) and "int8" not in heads
        same = total = right_trained = right_packed = same_noisy = 0
        noise = torch.Generator().manual_seed(0)
        worst = 0.0
        trained_in, trained_paths, trained_hooks = _sign_inputs(model)
        packed_in, packed_paths, packed_hooks = _sign_inputs(packed.net)
        paths = [p for p in trained_paths if p in packed_paths]
        flips = {p: 0 for p in paths}
        first_flip_margin = 0.0  # largest |input| of the trained model at a flip whose inputs all agreed
        with torch.no_grad():
            for x, y in data.loader("test", 1000):
                noisy = None
                if args.stem_precision == "int8":  # first: the sign hooks keep the last call's inputs
                    step, _ = image_quantization(x)
                    noisy = model(x + (torch.rand(x.shape, generator=noise) - 0.5) * step).argmax(1)
                a, b = model(x), packed(x)  # packed(x): the fused plan, as users run it
                packed.net(x)  # the module tree of the same layers, for the hooks at binary inputs
                same += (a.argmax(1) == b.argmax(1)).sum().item()
                right_trained += (a.argmax(1) == y).sum().item()
                right_packed += (b.argmax(1) == y).sum().item()
                if noisy is not None:
                    same_noisy += (noisy == a.argmax(1)).sum().item()
                total += len(y)
                worst = max(worst, ((a - b).abs() / a.abs().clamp_min(1e-6)).max().item())
                clean = torch.ones(len(y), dtype=torch.bool)  # images whose earlier binary inputs all agreed
                for path in paths:
                    differs = sign(trained_in[path]) != sign(packed_in[path])
                    per_image = differs.flatten(1).any(1)
                    flips[path] += int(differs.sum())
                    origin = differs & clean.view((-1,) + (1,) * (differs.dim() - 1))
                    if origin.any():
                        first_flip_margin = max(first_flip_margin, trained_in[path][origin].abs().max().item())
                    clean &= ~per_image
        for h in trained_hooks + packed_hooks:
            h.remove()
        size, float_size = os.path.getsize(packed_path), os.path.getsize(weights)
    print(
        f"{genotype.name} ({args.dataset}, stem {args.stem_precision}, shortcuts {args.shortcut_precision}, "
        f"head {args.head_precision}{' (kept float32: under INT8_HEAD_MIN_MACS)' if head_kept_float else ''}"
        f"{', on the pixel grid' if args.input_grid else ''}): same class on {same}/{total} test images; largest relative logit difference {worst:.2e}; "
        f"test accuracy trained {right_trained / total:.2%}, packed {right_packed / total:.2%}; "
        f"packed file {size:,} B vs float weights {float_size:,} B ({float_size / size:.1f}x smaller)"
    )
    if args.stem_precision == "int8":
        print(
            f"for scale: the trained model with noise of half an int8 step on each image predicts its own class "
            f"on {same_noisy}/{total}"
        )
        rounded, convs = _same_with_rounded_image_convs(model, data)
        if convs == 0:
            print("for scale: none of its convs with float weights reads the image, so there are no weights to round")
        else:
            print(
                f"for scale: with the weights of its {convs} image conv(s) rounded per output channel to "
                + ", ".join(f"{bits} bits" for bits in WEIGHT_BITS)
                + " (the image exact) it predicts its own class on "
                + ", ".join(f"{n}/{total}" for n in rounded)
            )
    print(
        "sign disagreements at binary layer inputs (the packed module tree, stem and shortcuts in float32): "
        + ", ".join(f"{p} {n}" for p, n in flips.items())
        + f"; where they start, the trained model's input was at most {first_flip_margin:.2e} from zero"
    )


if __name__ == "__main__":
    main()
