"""Readers on generated trees, transforms (random erasing against the original's algorithm), loaders with
mock images, the synthetic set and the messages for bad input. The PK sampler: test_sampler.py."""
import collections
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import build_datasets, read_dataset
from support import config, device_data, sampler, synthetic, transforms
from support.specs import AugmentSpec, BatchSpec, EmbedSpec, LoaderSpec, embed_spec, loader_spec
from support.utils import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jpeg(path, colour=(128, 64, 32), size=(8, 16)):
    """A tiny solid-colour JPEG at `path` (parents created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_market(folder, names_by_split):
    """Empty-content JPEGs named as given under bounding_box_train/, query/, bounding_box_test/."""
    for sub, names in zip(("bounding_box_train", "query", "bounding_box_test"), names_by_split):
        for name in names:
            write_jpeg(os.path.join(folder, sub, name))


MARKET_NAMES = (
    ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s1_000001_00.jpg",
     "-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg"],  # junk and a distractor in train: dropped
    ["0010_c1s1_001051_00.jpg", "-1_c2s1_000001_00.jpg", "0000_c3s1_000002_00.jpg"],
    ["0010_c6s2_001051_00.jpg", "0000_c1s1_000003_00.jpg", "-1_c4s1_000004_00.jpg"],
)


@pytest.fixture(scope="module")
def tiny_synthetic(synthetic_root):
    """The session's tiny synthetic data set (8 train + 8 test identities, 64x32): its folder."""
    return os.path.join(synthetic_root, "synthetic")


# ------------------------------------------------------------------------------------------------
# Readers


def test_market_drops_junk_everywhere_keeps_distractors_in_the_gallery_only(tmp_path):
    write_market(tmp_path / "Market-1501-v15.09.15", MARKET_NAMES)
    ds = read_dataset("market1501", str(tmp_path))  # ROOT holds the data set folder
    assert [(os.path.basename(p), pid, cam) for p, pid, cam in ds["train"]] == [
        ("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000551_01.jpg", 0, 1), ("0007_c3s1_000001_00.jpg", 1, 2)]
    assert ds["num_train_pids"] == 2 and ds["has_cameras"] and ds["name"] == "market1501"
    assert [(pid, cam) for _, pid, cam in ds["query"]] == [(10, 0)]
    assert sorted((pid, cam) for _, pid, cam in ds["gallery"]) == [(0, 0), (10, 5)]
    # the data set folder itself and the folder's own spelling as the name
    same = read_dataset("Market-1501-v15.09.15", str(tmp_path / "Market-1501-v15.09.15"))
    assert same["train"] == ds["train"] and same["gallery"] == ds["gallery"]


def test_duke_names_and_spelling(tmp_path):
    write_market(tmp_path / "DukeMTMC-reID", (["0005_c2_f0046985.jpg", "0001_c8_f0000001.jpg"],
                                             ["0030_c1_f0000002.jpg"], ["0030_c5_f0000003.jpg"]))
    ds = read_dataset("DukeMTMC-reID", str(tmp_path))
    assert [(pid, cam) for _, pid, cam in ds["train"]] == [(0, 7), (1, 1)]  # sorted pids 1, 5 -> 0, 1
    assert ds["name"] == "dukemtmcreid" and ds["query"][0][1:] == (30, 0)


def test_msmt17_lists_union_train_and_val_cameras_from_names(tmp_path):
    root = tmp_path / "MSMT17_V1"
    lists = {"list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                                "0002/0002_001_03_0303morning_0016_0.jpg 2"],
             "list_val.txt": ["0000/0000_002_15_0303noon_0001_1.jpg 0"],
             "list_query.txt": ["0000/0000_000_02_0113morning_0001_0.jpg 0"],
             "list_gallery.txt": ["0000/0000_001_05_0113noon_0002_0.jpg 0",
                                  "0001/0001_000_02_0113noon_0003_0.jpg 1"]}
    for list_name, lines in lists.items():
        sub = "train" if list_name in ("list_train.txt", "list_val.txt") else "test"
        for line in lines:
            write_jpeg(str(root / sub / line.split()[0]))
        (root / list_name).write_text("\n".join(lines) + "\n")
    ds = read_dataset("msmt17", str(tmp_path))
    assert [(pid, cam) for _, pid, cam in ds["train"]] == [(0, 0), (1, 2), (0, 14)]
    assert [(pid, cam) for _, pid, cam in ds["query"]] == [(1, 1)]  # test pids +1: pid 0 is "distractor"
    assert [(pid, cam) for _, pid, cam in ds["gallery"]] == [(1, 4), (2, 1)]
    assert all(os.path.isfile(p) for split in ("train", "query", "gallery") for p, _, _ in ds[split])


def write_coco(folder, split, entries, json_name=None):
    """A COCO-style file `split`.json and images folder/split/<file> for (file, pair_id, source)."""
    images = [{"id": i + 100, "file_name": f} for i, (f, _, _) in enumerate(entries)]
    annotations = [{"id": i, "image_id": i + 100, "pair_id": pair, "source": src}
                   for i, (_, pair, src) in enumerate(entries)]
    for f, _, _ in entries:
        write_jpeg(os.path.join(folder, split, f))
    with open(os.path.join(folder, json_name or f"{split}.json"), "w") as out:
        json.dump({"images": images, "annotations": annotations}, out)


def test_coco_fashion_sets_drop_single_image_train_pairs_and_have_no_cameras(tmp_path):
    folder = str(tmp_path / "street2shop")
    write_coco(folder, "train", [("a.jpg", 7, "user"), ("b.jpg", 7, "shop"), ("c.jpg", 3, "user"),
                                 ("d.jpg", 9, "user"), ("e.jpg", 9, "shop")], "train_128_256.json")
    write_coco(folder, "query", [("q.jpg", 0, "user")], "query_128_256.json")
    write_coco(folder, "gallery", [("g.jpg", 0, "shop"), ("h.jpg", 5, "shop")], "gallery_128_256.json")
    ds = read_dataset("Street2Shop", str(tmp_path))
    assert [(os.path.basename(p), pid) for p, pid, _ in ds["train"]] == [
        ("a.jpg", 0), ("b.jpg", 0), ("d.jpg", 1), ("e.jpg", 1)]  # pair 3 has one image: dropped
    assert [(pid, cam) for _, pid, cam in ds["query"]] == [(1, 0)]
    assert [(pid, cam) for _, pid, cam in ds["gallery"]] == [(1, 1), (6, 1)]  # never pid 0
    assert not ds["has_cameras"]


def test_folder_layout_with_and_without_cameras(tmp_path):
    for split, identity, name in [("train", "bob", "x_c2_1.jpg"), ("train", "ann", "y_c1_1.jpg"),
                                  ("query", "zed", "q_c2_1.jpg"), ("gallery", "zed", "g_c5_1.png"),
                                  ("gallery", "amy", "h_c1_1.jpg")]:
        write_jpeg(str(tmp_path / "cams" / split / identity / name))
    ds = read_dataset("folder", str(tmp_path / "cams"))
    assert ds["has_cameras"] and [(os.path.basename(p), pid, cam) for p, pid, cam in ds["train"]] == [
        ("y_c1_1.jpg", 0, 0), ("x_c2_1.jpg", 1, 1)]
    zed, amy = data.identity_pid("zed"), data.identity_pid("amy")  # pids of the names, whatever else is read
    assert ds["query"][0][1:] == (zed, 1)  # _c<N> -> N-1, as in Market names
    assert sorted(item[1:] for item in ds["gallery"]) == sorted([(amy, 0), (zed, 4)])
    for split, identity in [("train", "a"), ("train", "b"), ("query", "c"), ("gallery", "c")]:
        write_jpeg(str(tmp_path / "plain" / split / identity / "1.jpg"))
    ds = read_dataset("FOLDER", str(tmp_path / "plain"))
    c = data.identity_pid("c")
    assert not ds["has_cameras"] and ds["query"][0][1:] == (c, 0) and ds["gallery"][0][1:] == (c, 1)


def test_several_names_train_on_the_union_and_evaluate_the_first(tmp_path):
    write_market(tmp_path / "market1501", MARKET_NAMES)
    write_market(tmp_path / "DukeMTMC-reID", (["0005_c2_f0046985.jpg", "0001_c8_f0000001.jpg"],
                                             ["0030_c1_f0000002.jpg"], ["0030_c5_f0000003.jpg"]))
    ds = build_datasets(["dukemtmcreid", "market1501"], str(tmp_path))
    assert ds["num_train_pids"] == 4 and [pid for _, pid, _ in ds["train"]] == [0, 1, 2, 2, 3]
    assert ds["query"] == read_dataset("dukemtmcreid", str(tmp_path))["query"]


# ------------------------------------------------------------------------------------------------
# Transforms and loaders


def test_transform_shapes_and_flip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 30, 3), dtype=np.uint8))
    train = transforms.build_train_transform(AugmentSpec((64, 32)))(image)
    test = transforms.build_test_transform((64, 32))(image)
    assert train.shape == test.shape == (3, 64, 32) and train.dtype == torch.float32
    assert abs(float(test.mean())) < 2  # ImageNet-normalised, not 0..255
    flipped = transforms.build_train_transform(AugmentSpec((64, 32), flip_prob=1.0, padding=0, erasing_prob=0.0))(image)
    assert torch.allclose(flipped, test.flip(-1))


def test_pixel_mean_and_std_set_the_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 30, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    imagenet = transforms.build_test_transform((64, 32))(image)
    ours = transforms.build_test_transform((64, 32), pixel_mean=mean, pixel_std=std)(image)
    imagenet_std, imagenet_mean = torch.tensor(transforms.IMAGENET_STD), torch.tensor(transforms.IMAGENET_MEAN)
    pixels = imagenet * imagenet_std[:, None, None] + imagenet_mean[:, None, None]
    assert torch.allclose(ours, (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None],
                          atol=1e-5)


def erased_share(images, value):
    """Share of pixels of images [..., 3, H, W] equal to value (3 channels) in every channel."""
    return ((images - torch.tensor(value)[:, None, None]).abs() < 1e-6).all(dim=-3).float().mean().item()


def test_erasing_fills_the_box_with_pixel_mean_on_the_cpu_and_on_the_device():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8))
    mean = (0.5, 0.4, 0.3)
    torch.manual_seed(0)
    augment = AugmentSpec((64, 32), padding=0, erasing_prob=1.0, pixel_mean=mean)
    cpu = transforms.build_train_transform(augment)
    device = device_data.augment_batch([torch.from_numpy(np.array(image)).permute(2, 0, 1)] * 200, augment)
    shares = erased_share(torch.stack([cpu(image) for _ in range(200)]), mean), erased_share(device, mean)
    # mean erased share: E[area] = 0.21 x P(a box fits); both ways draw the same distribution
    assert 0.1 < shares[0] < 0.3 and abs(shares[0] - shares[1]) < 0.03, shares
    never = AugmentSpec((64, 32), erasing_prob=0.0, pixel_mean=mean)
    assert erased_share(transforms.build_train_transform(never)(image), mean) == 0


def original_erasing_box(rnd, height, width, log_aspect=False, tries=100):
    """The original RandomErasing's draw (datasets/transforms/random_erasing.py) as a loop: (top, left, h, w)
    or None. log_aspect + tries=10: torchvision's draw, which the comparison must tell apart."""
    prob, sl, sh, r1 = 0.5, 0.02, 0.4, 0.3  # the original's defaults
    if rnd.uniform(0, 1) >= prob:
        return None
    for _ in range(tries):
        target_area = rnd.uniform(sl, sh) * height * width
        aspect_ratio = (math.exp(rnd.uniform(math.log(r1), -math.log(r1))) if log_aspect
                        else rnd.uniform(r1, 1 / r1))
        h = round(math.sqrt(target_area * aspect_ratio))
        w = round(math.sqrt(target_area / aspect_ratio))
        if w < width and h < height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    return None


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def test_random_erasing_boxes_are_drawn_as_the_originals_loop():
    num, (height, width) = 10_000, (256, 128)
    rnd = random.Random(0)
    reference = [original_erasing_box(rnd, height, width) for _ in range(num)]
    torchvision_like = [original_erasing_box(rnd, height, width, log_aspect=True, tries=10) for _ in range(num)]
    torch.manual_seed(0)
    erase, top, left, h, w = transforms.random_erasing_boxes(num, height, width, "cpu")
    ours = torch.stack([top, left, h, w], 1)[erase].numpy()  # [erased, 4]
    reference = np.array([box for box in reference if box is not None])
    torchvision_like = np.array([box for box in torchvision_like if box is not None])
    # erasing rate: binomial, 10,000 draws each (sd ~ 0.005 per side)
    assert abs(len(ours) / num - len(reference) / num) < 0.025
    # top, left, h, w, area: the distributions agree (KS, 1e-3 level: 1.95 sqrt(2 / 5,000) = 0.039)
    stats = [ours[:, i] for i in range(4)] + [ours[:, 2] * ours[:, 3]]
    expected = [reference[:, i] for i in range(4)] + [reference[:, 2] * reference[:, 3]]
    distances = [ks_statistic(a, b) for a, b in zip(stats, expected)]
    assert max(distances) < 0.039, distances
    assert ks_statistic(ours[:, 2], torchvision_like[:, 2]) > 0.039  # a log-uniform aspect would be caught


def short_identity_items(tiny_synthetic):
    """Train items of the tiny set with the first identity cut to 2 images and the second to 6 (K = 4)."""
    items = read_dataset("synthetic", tiny_synthetic)["train"]
    by_pid = collections.defaultdict(list)
    for item in items:
        by_pid[item[1]].append(item)
    return by_pid[0][:2] + by_pid[1][:6] + [item for pid in sorted(by_pid)[2:] for item in by_pid[pid]]


def check_mock_batches(batches, num_instances):
    """Each batch (images, pids, camids, is_real): mocks are all-zero images at the end of their identity's
    chunk, with its pid; returns the number of mocks."""
    mocks = 0
    for images, pids, _, is_real in batches:
        assert is_real.dtype == torch.bool and len(is_real) == len(images) == len(pids)
        per_identity = is_real.view(-1, num_instances)
        assert (per_identity.int().diff(dim=1) <= 0).all() and per_identity[:, :2].all()  # real first, >= 2
        assert (images[~is_real] == 0).all() and (images[is_real].flatten(1).abs().amax(1) > 0).all()
        assert (pids.view(-1, num_instances) == pids.view(-1, num_instances)[:, :1]).all()
        mocks += int((~is_real).sum())
    return mocks


def test_without_resampling_the_train_loaders_pad_with_mock_images(tiny_synthetic):
    items = short_identity_items(tiny_synthetic)
    spec = LoaderSpec(BatchSpec(2, 4, "balanced", use_resampling=False, seed=1), AugmentSpec((32, 16)))
    loader, sampler = data.build_train_loader(items, spec, with_is_real=True)
    device_loader = device_data.DeviceAugmentLoader(items, spec, "cpu", with_is_real=True)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        device_loader.batch_sampler.set_epoch(epoch)
        expected = sum(i >= len(items) for batch in sampler for i in batch)
        assert check_mock_batches(loader, 4) == check_mock_batches(device_loader, 4) == expected
    assert expected > 0
    resampled, _ = data.build_train_loader(items, LoaderSpec(BatchSpec(2, 4), AugmentSpec((32, 16))), with_is_real=True)
    assert all(is_real.all() for _, _, _, is_real in resampled)
    with pytest.raises(DataError, match="use_resampling=False.*with_is_real=True"):
        data.build_train_loader(items, LoaderSpec(BatchSpec(2, 4, use_resampling=False), AugmentSpec((32, 16))))


def test_the_loader_and_embedding_specs_read_every_key_of_theirs_from_the_config():
    cfg, _, _ = config.parse([
        "--SOLVER.IMS_PER_BATCH", "3", "--DATALOADER.NUM_INSTANCE", "5", "--DATALOADER.SAMPLER", "balanced",
        "--DATALOADER.USE_RESAMPLING", "false", "--DATALOADER.DROP_LAST", "false", "--SOLVER.SEED", "7",
        "--INPUT.SIZE_TRAIN", "96", "48", "--INPUT.PROB", "0.25", "--INPUT.PADDING", "3", "--INPUT.RE_PROB", "0.75",
        "--INPUT.PIXEL_MEAN", "0.5", "0.4", "0.3", "--INPUT.PIXEL_STD", "0.2", "0.25", "0.3",
        "--DATALOADER.NUM_WORKERS", "2", "--INPUT.DEVICE_AUGMENT", "true",
        "--INPUT.SIZE_TEST", "80", "40", "--TEST.IMS_PER_BATCH", "9", "--TEST.FLIP_FEATS", "true"])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    assert loader_spec(cfg) == LoaderSpec(BatchSpec(3, 5, "balanced", use_resampling=False, drop_last=False, seed=7),
                                          AugmentSpec((96, 48), 0.25, 3, 0.75, mean, std), 2, device_augment=True)
    assert embed_spec(cfg, torch.float16) == EmbedSpec((80, 40), 9, 2, True, torch.float16, mean, std)
    assert embed_spec(cfg, size=[64, 32]).size == (64, 32)  # a checkpoint's test size
    defaults, _, _ = config.parse([])  # the specs' own defaults are the configuration's
    assert loader_spec(defaults) == LoaderSpec(BatchSpec(16), AugmentSpec(), defaults.DATALOADER.NUM_WORKERS)
    assert embed_spec(defaults) == EmbedSpec(num_workers=defaults.DATALOADER.NUM_WORKERS)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_and_test_loaders(tiny_synthetic, workers):
    ds = read_dataset("synthetic", os.path.dirname(tiny_synthetic))  # ROOT holding synthetic/
    loader, sampler = data.build_train_loader(ds["train"], LoaderSpec(BatchSpec(4, 3, seed=1), AugmentSpec((64, 32)),
                                                                      workers))
    sampler.set_epoch(0)
    images, pids, camids = next(iter(loader))
    assert images.shape == (12, 3, 64, 32) and len(set(pids.tolist())) == 4
    assert (pids.view(4, 3) == pids.view(4, 3)[:, :1]).all()
    test_loader = data.build_test_loader(ds["query"], EmbedSpec((64, 32), 5, workers))
    assert torch.cat([p for _, p, _ in test_loader]).tolist() == [pid for _, pid, _ in ds["query"]]


def test_sampler_stats_prints_both_samplers_on_a_set_and_on_a_simulated_list(tiny_synthetic):
    run = subprocess.run([sys.executable, "data.py", "sampler-stats", tiny_synthetic, "--ids", "2", "--epochs", "2"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    expected = [f"{s:<16} epoch {e}" for s in sampler.SAMPLERS for e in (0, 1)]
    assert [line.split(":")[0] for line in lines[1:]] == expected
    run = subprocess.run([sys.executable, "data.py", "sampler-stats", "--simulate", "market", "--epochs", "1",
                          "--sampler", "random_identity"], cwd=REPO, capture_output=True, text=True)
    assert run.stdout.startswith("751 identities, 12936 images") and "distinct co-batched" in run.stdout
    assert len(run.stdout.splitlines()) == 2


# ------------------------------------------------------------------------------------------------
# Synthetic data set


def test_synthetic_set_is_deterministic_market_named_with_junk_and_distractors(tiny_synthetic, tmp_path):
    again = str(tmp_path / "again")
    synthetic.synthesize(again, ids=16, images_per_id=6, cameras=3, size=(64, 32), progress=False)
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        names = sorted(os.listdir(os.path.join(tiny_synthetic, sub)))
        assert names == sorted(os.listdir(os.path.join(again, sub)))
        assert all(data.MARKET_PATTERN.fullmatch(n) for n in names)
        with open(os.path.join(tiny_synthetic, sub, names[-1]), "rb") as a, \
                open(os.path.join(again, sub, names[-1]), "rb") as b:
            assert a.read() == b.read()
    gallery = os.listdir(os.path.join(tiny_synthetic, "bounding_box_test"))
    assert any(n.startswith("-1_") for n in gallery) and any(n.startswith("0000_") for n in gallery)
    ds = read_dataset("synthetic", tiny_synthetic)
    assert ds["num_train_pids"] == 8
    assert sorted({pid for _, pid, _ in ds["train"]}) == list(range(8))  # relabelled 0..N-1
    for _, pid, cam in ds["query"]:  # every query has a true match in another camera
        assert any(g_pid == pid and g_cam != cam for _, g_pid, g_cam in ds["gallery"])
    assert Image.open(ds["query"][0][0]).size == (32, 64)
    with pytest.raises(DataError, match="already holds files"):
        synthetic.synthesize(again, ids=16, progress=False)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_missing_root_subfolder_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nowhere does not exist"):
        read_dataset("market1501", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"no market1501 data set.*Market-1501-v15.09.15/.*holds: nothing"):
        read_dataset("market1501", str(tmp_path))
    write_jpeg(str(tmp_path / "market1501" / "query" / "0001_c1s1_000001_00.jpg"))
    with pytest.raises(DataError, match=r"bounding_box_train/ but it is missing; .*market1501 holds: query/"):
        read_dataset("market1501", str(tmp_path))
    with pytest.raises(DataError, match="unknown data set .cuhk03.: use one of market1501"):
        read_dataset("cuhk03", str(tmp_path))


def test_names_that_do_not_match_show_one_that_would(tmp_path):
    write_market(tmp_path / "DukeMTMC-reID", (["0002_c1s1_000451_03.jpg"], ["x.jpg"], ["y.jpg"]))
    with pytest.raises(DataError, match=r"0002_c1s1_000451_03.jpg: the file name does not match.*"
                                        r"a name that would: 0005_c2_f0046985.jpg"):
        read_dataset("dukemtmcreid", str(tmp_path))


def test_an_empty_split_is_named(tmp_path):
    write_market(tmp_path, (["0002_c1s1_000451_03.jpg"], ["-1_c1s1_000001_00.jpg"], ["0002_c2s1_000001_00.jpg"]))
    with pytest.raises(DataError, match=f"the query split of market1501 in {tmp_path} is empty"):
        read_dataset("market1501", str(tmp_path))


def test_json_without_pair_id(tmp_path):
    write_coco(str(tmp_path), "train", [("a.jpg", 1, "user"), ("b.jpg", 1, "shop")])
    write_coco(str(tmp_path), "query", [("q.jpg", 1, "user")])
    write_coco(str(tmp_path), "gallery", [("g.jpg", 1, "shop")])
    coco = json.loads((tmp_path / "gallery.json").read_text())
    del coco["annotations"][0]["pair_id"]
    (tmp_path / "gallery.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r'gallery.json: annotation 0 has no "pair_id"'):
        read_dataset("df1", str(tmp_path))


def test_a_corrupt_image_names_its_path_at_load_time_and_check_lists_it(tmp_path):
    write_market(tmp_path, (["0002_c1s1_000451_03.jpg", "0002_c2s1_000452_03.jpg"], ["0005_c1s1_000001_00.jpg"],
                            ["0005_c2s1_000001_00.jpg"]))
    bad = tmp_path / "query" / "0005_c1s1_000001_00.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    ds = read_dataset("market1501", str(tmp_path))
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        data.ImageDataset(ds["query"], transforms.build_test_transform((16, 8)))[0]
    loader = data.build_test_loader(ds["query"], EmbedSpec((16, 8), 1, num_workers=1))  # raised in a worker
    with pytest.raises(DataError, match=f"^cannot read image {bad}") as error:
        next(iter(loader))
    assert "Traceback" not in str(error.value)
    run = subprocess.run([sys.executable, "data.py", "check", str(tmp_path), "--dataset", "market1501"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and str(bad) in run.stdout and "1 bad" in run.stdout
    assert "Traceback" not in run.stderr


def test_device_augment_loader_yields_pk_batches_and_names_a_corrupt_file(tiny_synthetic, tmp_path):
    items = read_dataset("synthetic", tiny_synthetic)["train"]
    spec = LoaderSpec(BatchSpec(2, 2), AugmentSpec((32, 16)))
    loader = device_data.DeviceAugmentLoader(items, spec, "cpu")
    images, pids, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 16) and images.dtype == torch.float32
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    bad_items = [(str(bad), pid, camid) for _, pid, camid in items]
    loader = device_data.DeviceAugmentLoader(bad_items, spec, "cpu")
    with pytest.raises(DataError, match=f"{bad}: not a readable JPEG"):
        for _ in loader:
            pass


def test_cli_errors_have_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "data.py", "check", str(tmp_path / "missing"), "--dataset", "duke"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: data root {tmp_path}/missing does not exist")
