"""Export a checkpoint's embedding model to ONNX and check it against PyTorch with onnxruntime.

    python export.py output/best.pth model.onnx [--size 256 128] [--check-images photos/]

The graph is the eval-mode model: images [B, 3, H, W] (RGB scaled to 0-1, then normalised with the
checkpoint's INPUT.PIXEL_MEAN / INPUT.PIXEL_STD, ImageNet's by default, as transforms.build_test_transform makes
them; B is dynamic) -> embeddings [B, D], the BNNeck output (L2-normalise it before comparing, as
retrieve.py does). The file's metadata (metadata_props) records that contract: input_size, pixel_mean,
pixel_std. Optional packages: onnx and onnxscript (the exporter), onnxruntime (the check).
"""
import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

from data import load_image
from retrieve import DEFAULT_SIZE, collect_images, input_size_for, load_model, normalisation_of
from support.synthetic import synthesize
from support.transforms import IMAGENET_MEAN, IMAGENET_STD, build_test_transform
from support.utils import UserError, command

INSTALL_HINT = "pip install onnx onnxscript onnxruntime"


class ExportError(UserError):
    """Export or check failed; the CLI prints the message without a traceback."""


def _require_modules(*modules):
    """Import the optional packages, or an ExportError naming the missing ones and how to install them."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs the optional package(s) {', '.join(missing)}: {INSTALL_HINT}")


def export_onnx(model, out_path, size=DEFAULT_SIZE, opset=None):
    """Write model's eval-mode forward to out_path as one ONNX file with a dynamic batch axis."""
    _require_modules("onnx", "onnxscript")
    model = model.cpu().eval()
    example = torch.zeros(2, 3, *size)  # batch 2: a batch of 1 would let the tracer specialise it
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on deprecated internals are not the user's business
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                    output_names=["embeddings"], dynamic_shapes={"x": {0: batch}},
                                    opset_version=opset, verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(out_path, external_data=False)  # one self-contained file (weights inside)
    write_contract(out_path, size, *normalisation_of(model))
    return out_path


def write_contract(onnx_path, size, pixel_mean, pixel_std):
    """Record what the graph expects in the file's metadata: input size and the normalisation of its input."""
    import onnx
    graph = onnx.load(onnx_path)
    contract = {"input_size": f"{size[0]} {size[1]}", "input": "RGB in 0-1, then (x - pixel_mean) / pixel_std",
                "pixel_mean": " ".join(map(str, pixel_mean)), "pixel_std": " ".join(map(str, pixel_std))}
    for key, value in contract.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, onnx_path)


def comparison_images(folder=None, count=8, size=DEFAULT_SIZE, normalisation=(IMAGENET_MEAN, IMAGENET_STD)):
    """The images the ONNX file is checked on: [count, 3, H, W] test-transformed images from a folder, or from a
    small generated set when None."""
    transform = build_test_transform(size, *normalisation)
    if folder:
        paths = [p for p, _, _ in collect_images([folder])][:count]
        return torch.stack([transform(load_image(p)) for p in paths])
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(os.path.join(tmp, "synthetic"), ids=4, images_per_id=count, cameras=2, size=tuple(size),
                   progress=False)
        paths = collect_images([os.path.join(tmp, "synthetic")])[:count]
        return torch.stack([transform(load_image(p)) for p, _, _ in paths])


def check_onnx(model, onnx_path, images):
    """Max abs difference between onnxruntime and PyTorch embeddings of images, at two batch sizes."""
    _require_modules("onnxruntime")
    import onnxruntime
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    worst = 0.0
    for batch in (images[:1], images):  # two batch sizes: the batch axis really is dynamic
        with torch.inference_mode():
            expected = model(batch).numpy()
        got = session.run(["embeddings"], {"images": batch.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


@command
def main(argv=None):
    """Export, then check on real images unless --no-check; exit status 1 when the difference is too large."""
    parser = argparse.ArgumentParser(description="Export the embedding model to ONNX and check it with onnxruntime.")
    parser.add_argument("checkpoint", help="our checkpoint (train.py) or an original centroids-reid .ckpt")
    parser.add_argument("out", help="ONNX file to write")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size (default: the checkpoint's test size, else 256 128)")
    parser.add_argument("--arch", help="refuse a checkpoint of another architecture (e.g. resnet50)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--check-images", metavar="DIR", help="images for the check (default: a generated set)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default: 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="export only (onnxruntime not needed)")
    args = parser.parse_args(argv)
    if not args.no_check:
        _require_modules("onnxruntime")  # fail before the (slow) export
    model = load_model(args.checkpoint, args.arch)
    size = input_size_for(model, args.size)
    export_onnx(model, args.out, size, args.opset)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {model.name}, input images "
          f"[batch, 3, {size[0]}, {size[1]}] -> embeddings [batch, {model.feat_dim}]")
    if args.no_check:
        return 0
    images = comparison_images(args.check_images, size=size, normalisation=normalisation_of(model))
    diff = check_onnx(model, args.out, images)
    verdict = "OK" if diff <= args.tolerance else "TOO LARGE"
    print(f"onnxruntime vs PyTorch on {len(images)} images (batches of 1 and {len(images)}): "
          f"max abs difference {diff:.2e} ({verdict}, tolerance {args.tolerance:.0e})")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
