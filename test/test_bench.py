"""bench.py: every stage's figure in the table and the JSON (tiny mode), the device script's CPU fallback, and the
device-side augmentation against the torchvision training transform."""
import json
import math
import os
import re
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from bench_runs import STAGES, run, run_bench
from PIL import Image

from support.device_data import augment_batch
from support.specs import AugmentSpec
from support.transforms import build_test_transform, build_train_transform


def test_tiny_bench_reports_every_stage_with_units_and_conditions(tmp_path):
    out = tmp_path / "bench.json"
    result = run([sys.executable, "bench.py", "--tiny", "--threads", "1", "--workers", "1", "--gpu-augment",
                  "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_figure = {(r["stage"], r["figure"]): r for r in rows}
    assert {r["stage"] for r in rows} == set(STAGES)
    for r in rows:  # every figure is a positive number (a memory increase may be 0) with its unit and conditions
        assert math.isfinite(r["value"]) and (r["value"] > 0 or r["unit"] == "MiB" and r["value"] == 0), r
        assert r["unit"] and r["device"].startswith("cpu") and r["dtype"] and r["batch"] and r["input"], r
        assert r["figure"] in result.stdout  # ... and is in the printed table
    step = {f: r for (s, f), r in by_figure.items() if s == "step"}
    full = next(r for f, r in step.items() if f.startswith("full step"))
    bare = next(r for f, r in step.items() if f.startswith("bare step"))
    ratio = next(r for f, r in step.items() if f.startswith("full / bare"))
    assert full["batch"] == "4x4=16" and full["input"] == "64x32" and ratio["unit"] == "x"
    # the ratio is a median of per-round ratios, so it need not equal the ratio of the medians, but it is close
    assert 0.5 < ratio["value"] * full["value"] / bare["value"] < 2
    loaders = [f for s, f in by_figure if s == "loader"]
    assert any("1 process" in f for f in loaders) and any("1 worker" in f for f in loaders)
    assert any("decode+augment on cpu" in f for f in loaders)  # --gpu-augment's loader (on the CPU here)
    assert sum(s == "e2e" and f.startswith("training epochs") for s, f in by_figure) == 2
    assert "| stage" in result.stdout and "images/s" in result.stdout


def test_device_script_says_it_fell_back_and_writes_json_to_out(tmp_path):
    result = run(["bash", "test/bench_device.sh", "--tiny", "--threads", "1", "--stages", "step", "metrics",
                  "--rounds", "1"], env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FELL BACK TO THE CPU" in result.stdout
    report = json.loads((tmp_path / "bench_device.json").read_text())
    assert "fallback" in report["meta"]["note"] and report["meta"]["device"].startswith("cpu")
    assert {r["stage"] for r in report["rows"]} == {"step", "metrics"}
    log = (tmp_path / "bench_device.log").read_text()  # the printed table, kept beside the JSON
    assert all(r["figure"] in log for r in report["rows"]) and "CPU time" in log


@pytest.fixture(scope="module")
def person_image(synthetic_root_128):
    """One synthetic 128x64 JPEG person, decoded as uint8 [3, 128, 64]."""
    train_dir = os.path.join(synthetic_root_128, "synthetic", "bounding_box_train")
    return Image.open(os.path.join(train_dir, sorted(os.listdir(train_dir))[0])).convert("RGB")


def test_device_augmentation_without_randomness_is_the_test_transform(person_image):
    image = torch.from_numpy(np.array(person_image)).permute(2, 0, 1)
    ours = augment_batch([image, image], AugmentSpec((64, 32), flip_prob=0, padding=0, erasing_prob=0))
    reference = build_test_transform((64, 32))(person_image)
    # torchvision resizes uint8 in fixed point and rounds to uint8: at most a grey level apart
    assert ours.shape == (2, 3, 64, 32)
    assert (ours - reference).abs().max() < 1.5 / 255 / 0.224


def augmentation_statistics(batch):
    """[N, 3, H, W] normalised images -> (share of padded pixels, of erased pixels, of images with erasing)."""
    black = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    padded = (batch - black[:, None, None]).abs().amax(dim=1) < 1e-4
    # random erasing writes INPUT.PIXEL_MEAN into the normalised tensor, as the original does
    erased = (batch - torch.tensor([0.485, 0.456, 0.406])[:, None, None]).abs().amax(dim=1) < 1e-6
    return padded.float().mean().item(), erased.float().mean().item(), erased.flatten(1).any(1).float().mean().item()


def test_device_augmentation_pads_crops_and_erases_like_the_torchvision_transform(person_image):
    torch.manual_seed(0)
    num = 400
    image = torch.from_numpy(np.array(person_image)).permute(2, 0, 1)
    ours = augmentation_statistics(augment_batch([image] * num, AugmentSpec((64, 32))))
    transform = build_train_transform(AugmentSpec((64, 32)))
    theirs = augmentation_statistics(torch.stack([transform(person_image) for _ in range(num)]))
    assert ours[0] > 0.05 and ours[1] > 0.02 and ours[2] > 0.3  # each augmentation happens...
    for a, b in zip(ours, theirs):  # ... as often and as much as with torchvision (400 draws: a few % apart)
        assert abs(a - b) < 0.05, (ours, theirs)


def test_device_augmentation_flips_half_of_the_images():
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 32, dtype=torch.uint8)
    image[:, :, :16] = 255  # bright left half: a flipped image is bright on the right
    out = augment_batch([image] * 400, AugmentSpec((64, 32), padding=0, erasing_prob=0))
    flipped = out[:, :, :, 16:].mean(dim=(1, 2, 3)) > out[:, :, :, :16].mean(dim=(1, 2, 3))
    assert 0.4 < flipped.float().mean().item() < 0.6
    never = augment_batch([image] * 50, AugmentSpec((64, 32), flip_prob=0, padding=0, erasing_prob=0))
    assert (never[:, :, :, :16].mean(dim=(1, 2, 3)) > never[:, :, :, 16:].mean(dim=(1, 2, 3))).all()


# ---------------------------------------------------------------------------------------------------
# the search stage, small, through the command line

def test_centroid_index_is_smaller_and_search_backends_agree(tmp_path):
    _, rows = run_bench(["--stages", "search", "--metrics-size", "200", "2000", "50", "--centroid-dim", "64",
                         "--large-search", "20000", "32", "20"], tmp_path)
    value = {r["figure"]: r["value"] for r in rows}
    # 'per centroid index, 1,234 entries (50 centroids + 1,184 distractor images), 64-d: index size'
    named = (re.match(r"(per \w+) index, ([\d,]+) entries \((?:([\d,]+) centroids)?", figure) for figure in value)
    indexes = {m[1]: (int(m[2].replace(",", "")), int((m[3] or "0").replace(",", ""))) for m in named if m}
    (per_image, _), (per_centroid, centroids) = indexes["per image"], indexes["per centroid"]
    assert per_centroid < per_image and centroids == 50
    assert value["queries whose own gallery vector came first (exact)"] == 100  # a slightly moved gallery vector
    if find_spec("faiss"):  # the faiss backend where it is installed
        assert value["queries with the same top-k from faiss as from the exact search"] == 100
