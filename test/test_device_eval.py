"""Evaluation with decoding on the device (device_data.device_test_batches): the same batches, labels and features as
the CPU test loader (run here on the CPU with the same code), and a clear error for a file no decoder reads."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
from evaluate import extract_features
from model import build_model
from support import device_data, utils
from support.specs import EmbedSpec

SIZE = (64, 32)


@pytest.fixture(scope="module")
def items(synthetic_root_128, tmp_path_factory):
    """Query + gallery items of a tiny synthetic set (128x64 JPEGs), with one PNG among them (in a copy: the
    session's set stays as it is)."""
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    shutil.copytree(os.path.join(synthetic_root_128, "synthetic"), root)
    split = data.read_dataset("synthetic", root)
    items = split["query"] + split["gallery"]
    png = os.path.splitext(items[1][0])[0] + ".png"  # a non-JPEG file is decoded on the host
    Image.open(items[1][0]).save(png)
    return [items[0], (png, *items[1][1:])] + items[2:]


def test_device_batches_hold_the_cpu_loaders_images_in_the_same_order(items):
    spec = EmbedSpec(SIZE, batch_size=7, num_workers=0)
    cpu = list(data.build_test_loader(items, spec))
    dev = list(device_data.device_test_batches(items, spec, device="cpu"))
    assert len(cpu) == len(dev) == -(-len(items) // 7)
    for (a, a_pids, a_camids), (b, b_pids, b_camids) in zip(cpu, dev):
        assert b.shape == a.shape and b.dtype == torch.float32
        assert torch.equal(a_pids, b_pids) and torch.equal(a_camids, b_camids)
        # PIL and libjpeg-turbo may round the colour conversion differently, and the CPU transform rounds its
        # resized pixels to uint8: a few grey levels apart at most (1/255 is 0.017 after normalisation)
        assert (a - b).abs().mean() < 0.01 and (a - b).abs().amax() < 0.06


def test_extract_features_gives_the_same_embeddings_with_either_loader(items):
    torch.manual_seed(0)
    model = build_model("resnet18", 6)
    spec = EmbedSpec(SIZE, 8, 0)
    cpu = extract_features(model, data.build_test_loader(items, spec), torch.device("cpu"))
    dev = extract_features(model, device_data.device_test_batches(items, spec, "cpu"), torch.device("cpu"))
    np.testing.assert_array_equal(cpu[1], dev[1])
    np.testing.assert_array_equal(cpu[2], dev[2])
    assert dev[0].shape == cpu[0].shape and dev[0].device.type == "cpu"
    cosine = (cpu[0] * dev[0]).sum(dim=1)  # both L2-normalised
    assert cosine.min() > 0.999


def test_a_file_no_decoder_reads_is_named(items, tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(utils.DataError, match="0001_c1s1_000001_00.jpg"):
        list(device_data.device_test_batches(items[:3] + [(str(bad), 1, 0)], EmbedSpec(SIZE, 4, 0), "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decoding needs a CUDA device")
def test_nvjpeg_batches_match_the_cpu_loader(items):
    spec = EmbedSpec(SIZE, batch_size=8, num_workers=0)
    cpu = list(data.build_test_loader(items, spec))
    dev = list(device_data.device_test_batches(items, spec, device="cuda"))
    for (a, a_pids, _), (b, b_pids, _) in zip(cpu, dev):
        assert b.device.type == "cuda" and b.shape == a.shape and torch.equal(a_pids, b_pids)
        # nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo's by a few grey levels
        assert (a - b.cpu()).abs().mean() < 0.05
