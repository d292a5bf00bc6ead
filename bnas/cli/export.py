"""``bnas export GENOTYPE CHECKPOINT --out FILE [--format bnas|lce|onnx] [--verify N]``: a trained
checkpoint as a packed ``.bnas`` file (bnas's XNOR kernels), a Larq Compute Engine flatbuffer
(``.tflite``, ARM devices; extra ``[lce]``) or ONNX (any ONNX runtime; extra ``[onnx]``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import torch

from ..atomic import check_writable_file
from ..data import DATASETS, load_dataset
from ..export import export
from ..export.format import ExportError
from ..genotype import Genotype
from .catalogs import add_catalog_argument, load_catalogs

__all__ = ["add_parser"]

FORMATS = ("bnas", "lce", "onnx")
_EXAMPLES = {"bnas": "model.bnas", "lce": "model.tflite", "onnx": "model.onnx"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained checkpoint: packed 1-bit model (.bnas), LCE flatbuffer (.tflite) or ONNX",
    )
    p.add_argument("genotype", help="genotype YAML file the checkpoint was trained from")
    p.add_argument("checkpoint", help="checkpoint.pt (trainer checkpoint) or model.pt (state_dict) from bnas eval")
    p.add_argument("--out", required=True, help="file to write (model.bnas, model.tflite or model.onnx)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="bnas",
        help="bnas: packed for bnas's XNOR kernels (default); lce: Larq Compute Engine flatbuffer for ARM "
        "(needs the [lce] extra); onnx: standard ONNX, for portability, not speed (needs the [onnx] extra)",
    )
    p.add_argument(
        "--verify",
        type=int,
        metavar="N",
        help="after writing an lce or onnx file, run N validation images of --dataset through it and through "
        "the PyTorch model: share of identical classes, largest logit difference",
    )
    p.add_argument(
        "--dataset", help=f"with --verify: the dataset the checkpoint was trained on ({', '.join(DATASETS)})"
    )
    p.add_argument("--data-root", help="data folder (default $BNAS_DATA, else ~/.cache/bnas/data)")
    add_catalog_argument(p)
    p.set_defaults(handler=run_export)


def _check_verify_args(args: argparse.Namespace) -> None:
    if args.verify is None:
        return
    if args.format == "bnas":
        raise ExportError("--verify N checks an lce or onnx file; use it with --format lce or --format onnx")
    if args.verify < 1:
        raise ExportError(f"--verify {args.verify}: give a positive number of validation images")
    if not args.dataset:
        raise ExportError(
            "--verify N needs --dataset NAME: the dataset the checkpoint was trained on (as given to bnas eval)"
        )


def run_export(args: argparse.Namespace) -> int:
    # before reading the checkpoint: --out is a file, and its folder must take one
    check_writable_file(Path(args.out), "--out", example=_EXAMPLES[args.format])
    _check_verify_args(args)
    load_catalogs(args)  # before the genotype is built: its ops may be the catalogs' presets
    if args.format == "bnas":
        packed, path = export(args.genotype, args.checkpoint, args.out)
        kinds: dict[str, int] = {}
        for entry in packed.layers:
            kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        print(
            f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB; {summary}); "
            f"checkpoint {Path(args.checkpoint).stat().st_size / 1024:.1f} KiB"
        )
        return 0
    return _run_deploy_export(args)


def _run_deploy_export(args: argparse.Namespace) -> int:
    from ..export.deploy import load_trained  # the lce / onnx path only: TF and onnx load lazily

    model = load_trained(args.genotype, args.checkpoint)
    if args.format == "lce":
        from ..export.lce import to_lce

        path = to_lce(model, args.out)
        what = "LCE flatbuffer"
    else:
        from ..export.onnx import to_onnx

        path = to_onnx(model, args.out)
        what = "ONNX, float +-1 weights: for portability, not speed"
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB; {what}); "
        f"checkpoint {Path(args.checkpoint).stat().st_size / 1024:.1f} KiB"
    )
    if args.verify:
        from ..export.verify import verify

        genotype = cast(Genotype, model.genotype)  # load_trained built it from one
        shape = cast(tuple[int, int, int], tuple(genotype.input))
        data = load_dataset(args.dataset, args.data_root, shape=shape, num_classes=genotype.num_classes)
        split = "val" if len(data.val_x) else "test"
        batches = []
        for x, _ in data.loader(split, 256):  # normalised as training saw them
            batches.append(x)
            if sum(len(b) for b in batches) >= args.verify:
                break
        images = torch.cat(batches)[: args.verify]
        if tuple(images.shape[1:]) != tuple(genotype.input):
            raise ExportError(
                f"--dataset {args.dataset} has images of shape {list(images.shape[1:])}, genotype "
                f"{genotype.name!r} takes {list(genotype.input)}; pass the dataset it was trained on"
            )
        result = verify(model, path, args.format, images[: args.verify])
        engine = "LCE's interpreter" if args.format == "lce" else "onnxruntime"
        print(
            f"verify ({result.images} {'validation' if split == 'val' else 'test'} images of {args.dataset}, {engine} vs PyTorch): {result.line()}"
        )
    return 0
