"""Data: data-set readers, the one parser of identities and cameras from names, images and the loaders.

    python data.py synthesize data/synthetic                  # write the synthetic data set
    python data.py check data --dataset dukemtmcreid          # counts per split, decode every image
    python data.py sampler-stats data --dataset synthetic   # batch make-up of both PK samplers per epoch
    python data.py sampler-stats --simulate market           # ... on a Market-1501-sized label list

Every reader returns train / query / gallery lists of (path, pid, camid). Train pids are relabelled
0..N-1 in sorted order; query/gallery pids are >= 1 except distractors, which carry pid 0 (the
evaluator's convention); camids are 0-based.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from support import utils
from support.image_check import dataset_paths, find_bad_images
from support.sampler import (
    SAMPLERS,
    SIMULATED,
    SeededBatches,
    print_sampler_statistics,
    simulated_pids,
    train_sampler,
)
from support.specs import BatchSpec
from support.synthetic import synthesize
from support.transforms import build_test_transform, build_train_transform
from support.utils import DataError, folder_listing, split_item, usable_workers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MARKET_SPLITS = (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))
CAMERA_IN_NAME = re.compile(r"_c(\d+)")  # camera N of a file name, from 1 (camera_of)
HASHED_PIDS = 2**62  # pids of identity names that are not numbers start here (identity_pid)
MSMT_LISTS = (("train", "list_train.txt"), ("train", "list_val.txt"),
              ("query", "list_query.txt"), ("gallery", "list_gallery.txt"))


# ----------------------------------------------------------------------------------------------
# Data-set folders


def _require(path, what, kind="dir"):
    """Raise DataError unless `path` exists; say what the parent folder holds instead."""
    ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not ok:
        parent = os.path.dirname(path) or "."
        raise DataError(f'{what}: expected {path}{"/" if kind == "dir" else ""} but it is missing; '
                        f'{parent} holds: {folder_listing(parent)}')
    return path


def find_dataset_folder(name, root):
    """The data set folder of `name`: ROOT itself if it holds the layout, else ROOT/<known folder>."""
    spec = DATASETS[name]
    if not os.path.isdir(root):
        raise DataError(f'data root {root} does not exist (--DATASETS.ROOT_DIR: the folder holding '
                        f'{spec["folders"][0]}/ or that folder itself)')
    if name == "folder" or any(os.path.exists(os.path.join(root, p)) for p in spec["parts"]):
        return root
    by_lower = {n.lower(): n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))}
    for folder in spec["folders"]:
        if folder.lower() in by_lower:
            return os.path.join(root, by_lower[folder.lower()])
    expected = " or ".join(f"{root}/{f}/" for f in spec["folders"])
    hint = f"; write it with: python data.py synthesize {root}/synthetic" if name == "synthetic" else ""
    raise DataError(f'no {name} data set in {root}: expected {expected} holding '
                    f'{", ".join(spec["parts"])}, or {root} itself holding them; '
                    f'{root} holds: {folder_listing(root)}{hint}')


# ----------------------------------------------------------------------------------------------
# Readers. Each returns {'train', 'query', 'gallery'} with data-set pids, and has_cameras.


def _market_split(folder, sub, pattern, example):
    """(path, pid, camid) of every image in folder/sub named by `pattern`; junk (pid -1) dropped."""
    directory = _require(os.path.join(folder, sub), f"{sub}/ of {folder}")
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith(".jpg"))
    if not files:
        raise DataError(f"{directory} holds no .jpg images (holds: {folder_listing(directory)})")
    items = []
    for file in files:
        match = pattern.fullmatch(file)
        if match is None:
            raise DataError(f"{os.path.join(directory, file)}: the file name does not match "
                            f"{pattern.pattern} (a name that would: {example})")
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1:
            raise DataError(f"{os.path.join(directory, file)}: cameras are numbered from c1")
        if pid != -1:
            items.append((os.path.join(directory, file), pid, cam - 1))
    return items


def read_market_style(folder, pattern, example):
    """Market-1501 / DukeMTMC-reID layout: bounding_box_train/, query/, bounding_box_test/.

    The file name gives the pid and the 1-based camera (`pattern` groups 1 and 2), e.g. Market
    `0002_c1s1_000451_03.jpg`, Duke `0005_c2_f0046985.jpg`. pid -1 (junk) is dropped everywhere,
    pid 0 (distractor) is kept in the gallery only."""
    splits = {split: _market_split(folder, sub, pattern, example) for split, sub in MARKET_SPLITS}
    splits["train"] = [item for item in splits["train"] if item[1] != 0]
    splits["query"] = [item for item in splits["query"] if item[1] != 0]
    return splits, True


def _msmt_camera(path):
    """1-based camera of an MSMT17 file name -> 0-based: `_c03_` if present, else the third
    underscore field (the official `0000_000_01_0303morning_0015_0.jpg`: camera 01)."""
    camera, fields = camera_of(path), os.path.basename(path).split("_")
    if camera < 0 and (len(fields) < 3 or not fields[2].isdigit()):
        raise DataError(f"{path}: no camera in the file name (expected e.g. "
                        f"0000_000_01_0303morning_0015_0.jpg, camera 01)")
    return camera if camera >= 0 else int(fields[2]) - 1


def read_msmt17(folder):
    """MSMT17 list files `relative/path pid`: train = list_train.txt + list_val.txt (same pid
    space, as the community trains), query/gallery = list_query.txt / list_gallery.txt. Paths are
    relative to train/ and test/ (V1), mask_train_v2/ and mask_test_v2/ (V2) or the folder itself.
    The camera comes from the file name (1-based -> 0-based, see _msmt_camera). Test pids start at
    0 in the lists and are shifted by +1 here, since pid 0 means "distractor" to the evaluator."""
    splits = {"train": [], "query": [], "gallery": []}
    for split, list_name in MSMT_LISTS:
        list_path = _require(os.path.join(folder, list_name), "MSMT17 list file", kind="file")
        with open(list_path) as f:
            rows = [line.split() for line in f if line.strip()]
        if not rows:
            raise DataError(f'{list_path} is empty (expected lines of "relative/path pid")')
        bad = next((i for i, r in enumerate(rows) if len(r) != 2 or not r[1].lstrip("-").isdigit()), None)
        if bad is not None:
            raise DataError(f'{list_path} line {bad + 1}: expected "relative/path pid", '
                            f'got {" ".join(rows[bad])!r}')
        subs = ("train", "mask_train_v2", "") if split == "train" else ("test", "mask_test_v2", "")
        base = next((os.path.join(folder, s) for s in subs
                     if os.path.isfile(os.path.join(folder, s, rows[0][0]))), None)
        if base is None:
            raise DataError(f'{list_path} line 1: image {rows[0][0]} not found under '
                            f'{", ".join(os.path.join(folder, s) for s in subs)}')
        shift = 0 if split == "train" else 1
        splits[split] += [(os.path.join(base, p), int(pid) + shift, _msmt_camera(p)) for p, pid in rows]
    return splits, True


def _coco_json_paths(folder, json_train_path=""):
    """train/query/gallery JSON files: `json_train_path` (DATASETS.JSON_TRAIN_PATH) or `train*.json` in the
    folder (`train.json` preferred); query and gallery are named like it with 'train' replaced in the file
    name (the original's rule: train_128_256.json -> query_128_256.json, gallery_128_256.json)."""
    if json_train_path:
        _require(json_train_path, "DATASETS.JSON_TRAIN_PATH (the train annotations)", kind="file")
        folder, train = os.path.split(json_train_path)
        if "train" not in train:
            raise DataError(f'DATASETS.JSON_TRAIN_PATH {json_train_path}: the file name must contain "train" '
                            '(query and gallery files are named by replacing it)')
    else:
        candidates = sorted(f for f in os.listdir(folder) if f.startswith("train") and f.endswith(".json"))
        if not candidates:
            raise DataError(f"{folder} holds no train*.json annotation file (expected train.json, "
                            f"query.json, gallery.json; holds: {folder_listing(folder)}); "
                            "or set DATASETS.JSON_TRAIN_PATH")
        if len(candidates) > 1 and "train.json" not in candidates:
            raise DataError(f'{folder} holds several train*.json files ({", ".join(candidates)}): keep one, '
                            'or name it with DATASETS.JSON_TRAIN_PATH')
        train = "train.json" if "train.json" in candidates else candidates[0]
    return {split: _require(os.path.join(folder, train.replace("train", split, 1)),
                            f"{split} annotations", kind="file") for split in ("train", "query", "gallery")}


def _read_coco_split(json_path, image_dir):
    """(path, pair_id) per annotation of a COCO-style file (`images`: id, file_name;
    `annotations`: image_id, pair_id, source)."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: not a readable JSON file ({e})") from None
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise DataError(f'{json_path}: expected a COCO-style object with "images" and "annotations"')
    try:
        file_names = {image["id"]: image["file_name"] for image in coco["images"]}
    except (KeyError, TypeError):
        raise DataError(f'{json_path}: every entry of "images" needs "id" and "file_name"') from None
    items = []
    for i, ann in enumerate(coco["annotations"]):
        if "pair_id" not in ann:
            raise DataError(f'{json_path}: annotation {i} has no "pair_id" (keys: {", ".join(ann)}); '
                            f'each annotation needs image_id, pair_id and source (user/shop)')
        if ann.get("image_id") not in file_names:
            raise DataError(f'{json_path}: annotation {i} refers to image_id {ann.get("image_id")!r}, '
                            f'which is not in "images"')
        if not isinstance(ann["pair_id"], int) or ann["pair_id"] < 0:
            raise DataError(f'{json_path}: annotation {i} has pair_id {ann["pair_id"]!r}, expected an int >= 0')
        items.append((os.path.join(image_dir, file_names[ann["image_id"]]), ann["pair_id"]))
    return items


def read_coco(folder, json_train_path=""):
    """Fashion retrieval (DeepFashion consumer-to-shop `df1`, `street2shop`), the original's layout:
    train/, query/, gallery/ image folders and train.json, query.json, gallery.json beside them.
    No cameras: query cam 0, gallery cam 1 (train cam 0). Train pair_ids with fewer than 2 images
    are dropped; query/gallery pids are pair_id + 1, since pid 0 means "distractor"."""
    jsons = _coco_json_paths(folder, json_train_path)
    splits = {}
    for split, camid in (("train", 0), ("query", 0), ("gallery", 1)):
        image_dir = _require(os.path.join(folder, split), f"{split} images")
        pairs = _read_coco_split(jsons[split], image_dir)
        shift = 0 if split == "train" else 1
        splits[split] = [(path, pair_id + shift, camid) for path, pair_id in pairs]
    pair_ids, counts = np.unique([pid for _, pid, _ in splits["train"]], return_counts=True)
    keep = set(pair_ids[counts >= 2].tolist())
    splits["train"] = [item for item in splits["train"] if item[1] in keep]
    return splits, False


# ----------------------------------------------------------------------------------------------
# The one parser of cameras and identities from file and folder names (read_folder, retrieve.py)


def camera_of(path):
    """0-based camera of a file name's `_c<N>`, numbered from c1 as in Market-1501 (c1 -> 0); -1 when none."""
    found = CAMERA_IN_NAME.search(os.path.basename(path))
    if found is None:
        return -1
    if int(found.group(1)) < 1:
        raise DataError(f"{path}: cameras are numbered from c1 (_c1 is the first camera), not _c0: rename it")
    return int(found.group(1)) - 1


def identity_pid(name):
    """The pid of an identity name, the same whichever images are read with it: a positive number is itself
    (0002 -> 2, as in Market-1501 file names), any other name a fixed 62-bit hash of it (>= 2**62); '' -> 0."""
    if not name:
        return 0
    if name.isascii() and name.isdigit() and 0 < int(name) < 2**63:
        return int(name)
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return HASHED_PIDS + int.from_bytes(digest, "big") % HASHED_PIDS


def identity_pids(names):
    """identity_pid of each name; DataError when two different names give one pid (e.g. folders 1 and 0001)."""
    pid_of = {name: identity_pid(name) for name in dict.fromkeys(names)}
    owner = {}
    for name, pid in pid_of.items():
        if owner.setdefault(pid, name) != name:
            raise DataError(f"identities {owner[pid]!r} and {name!r} name the same pid {pid}: rename one of them")
    return [pid_of[name] for name in names]


def _identity_files(folder):
    """{split: [(path, identity folder name)]} of ROOT/{train,query,gallery}/<identity>/<image>."""
    named = {}
    for split in ("train", "query", "gallery"):
        directory = _require(os.path.join(folder, split), f"{split} identities")
        named[split] = []
        for entry in sorted(os.listdir(directory)):
            identity_dir = os.path.join(directory, entry)
            if not os.path.isdir(identity_dir):
                if entry.lower().endswith(IMAGE_EXTENSIONS):
                    raise DataError(f"{identity_dir}: images go into {directory}/<identity>/, one "
                                    f"folder per identity (e.g. {directory}/0001/{entry})")
                continue
            named[split] += [(os.path.join(identity_dir, f), entry) for f in sorted(os.listdir(identity_dir))
                             if f.lower().endswith(IMAGE_EXTENSIONS)]
    return named


def read_folder(folder):
    """Users' own data: ROOT/{train,query,gallery}/<identity>/<image>. The camera is camera_of the file name
    (`_c<N>` -> N-1) when every file has one, else the data is camera-agnostic (query cam 0, gallery cam 1).
    Query/gallery pids are identity_pid of the folder names (retrieve.py gives the same); train identities
    are numbered 0..N-1 by sorted name."""
    named = _identity_files(folder)
    all_files = [path for items in named.values() for path, _ in items]
    cams = {path: camera_of(path) for path in all_files}
    has_cameras = bool(all_files) and min(cams.values()) >= 0
    if not has_cameras and max(cams.values(), default=-1) >= 0:
        without = next(p for p in all_files if cams[p] < 0)
        raise DataError(f"{without} has no _c<N> camera in its name while other files have one: "
                        f"name every file with a camera (e.g. img_c1_0001.jpg) or none")
    test_names = [name for split in ("query", "gallery") for _, name in named[split]]
    test_pid = dict(zip(test_names, identity_pids(test_names)))
    train_pid = {name: i for i, name in enumerate(sorted({name for _, name in named["train"]}))}
    splits = {}
    for split, default_cam in (("train", 0), ("query", 0), ("gallery", 1)):
        pid_of = train_pid if split == "train" else test_pid
        splits[split] = [(p, pid_of[name], cams[p] if has_cameras else default_cam) for p, name in named[split]]
    return splits, has_cameras


# canonical name -> reader, data set folder names tried under ROOT, layout parts, accepted spellings
MARKET_PATTERN = re.compile(r"(-?\d+)_c(\d+)s\d+_\d+_\d+\.jpg")
DUKE_PATTERN = re.compile(r"(-?\d+)_c(\d+)_f\d+\.jpg")
_MARKET_PARTS = tuple(sub for _, sub in MARKET_SPLITS)
_COCO_PARTS = ("train", "query", "gallery", "train.json")
DATASETS = {
    "market1501": dict(read=lambda f: read_market_style(f, MARKET_PATTERN, "0002_c1s1_000451_03.jpg"),
                       folders=("Market-1501-v15.09.15", "market1501", "Market-1501"), parts=_MARKET_PARTS,
                       aliases=("market-1501-v15.09.15", "market-1501", "market")),
    "dukemtmcreid": dict(read=lambda f: read_market_style(f, DUKE_PATTERN, "0005_c2_f0046985.jpg"),
                         folders=("DukeMTMC-reID", "dukemtmcreid"), parts=_MARKET_PARTS,
                         aliases=("dukemtmc-reid", "dukemtmc", "duke")),
    "msmt17": dict(read=read_msmt17, folders=("MSMT17", "MSMT17_V1", "MSMT17_V2"),
                   parts=tuple(f for _, f in MSMT_LISTS), aliases=("msmt17_v1", "msmt17_v2", "msmt")),
    "df1": dict(read=read_coco, folders=("df1", "deepfashion", "consumer_to_shop"), parts=_COCO_PARTS,
                aliases=("deepfashion", "deep_fashion")),
    "street2shop": dict(read=read_coco, folders=("street2shop",), parts=_COCO_PARTS, aliases=()),
    "folder": dict(read=read_folder, folders=(".",), parts=("train", "query", "gallery"), aliases=()),
    "synthetic": dict(read=lambda f: read_market_style(f, MARKET_PATTERN, "0002_c1s1_000451_03.jpg"),
                      folders=("synthetic",), parts=_MARKET_PARTS, aliases=()),
}
ALIASES = {alias: name for name, spec in DATASETS.items() for alias in (name,) + spec["aliases"]}


def canonical_name(name):
    """The canonical data set name of a spelling (case-insensitive, e.g. DukeMTMC-reID -> dukemtmcreid)."""
    key = name.strip().lower()
    if key not in ALIASES:
        raise DataError(f'unknown data set {name!r}: use one of {", ".join(DATASETS)}')
    return ALIASES[key]


def read_dataset(name, root, json_train_path=""):
    """Read one data set: {'train', 'query', 'gallery', 'num_train_pids', 'has_cameras', 'name'}.

    json_train_path (df1, street2shop) names the train JSON as the original's DATASETS.JSON_TRAIN_PATH does;
    ROOT is then the folder of the train/, query/ and gallery/ images."""
    name = canonical_name(name)
    if json_train_path:
        if DATASETS[name]["read"] is not read_coco:
            raise DataError(f"DATASETS.JSON_TRAIN_PATH is for the COCO-style sets (df1, street2shop), not {name}: "
                            "leave it empty")
        folder = _require(root, "DATASETS.ROOT_DIR (the image folder)")
        splits, has_cameras = read_coco(folder, json_train_path)
    else:
        folder = find_dataset_folder(name, root)
        splits, has_cameras = DATASETS[name]["read"](folder)
    for split, items in splits.items():
        if not items:
            raise DataError(f'the {split} split of {name} in {folder} is empty (after dropping junk '
                            f'pid -1{", distractors pid 0" if split != "gallery" else ""}'
                            f'{" and pair_ids with one image" if DATASETS[name]["read"] is read_coco else ""})')
    train_pids = sorted({pid for _, pid, _ in splits["train"]})
    relabel = {pid: label for label, pid in enumerate(train_pids)}
    train = [(path, relabel[pid], camid) for path, pid, camid in splits["train"]]
    return dict(train=train, query=splits["query"], gallery=splits["gallery"],
                num_train_pids=len(train_pids), has_cameras=has_cameras, name=name)


def build_datasets(names, root, json_train_path=""):
    """Train on the union of `names` (pids offset per set); query/gallery/has_cameras of the first."""
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    if not names:
        raise DataError("no data set name given (--DATASETS.NAMES)")
    datasets = [read_dataset(name, root, json_train_path) for name in names]
    train, offset = [], 0
    for ds in datasets:
        train += [(path, pid + offset, camid) for path, pid, camid in ds["train"]]
        offset += ds["num_train_pids"]
    first = datasets[0]
    return dict(train=train, query=first["query"], gallery=first["gallery"], num_train_pids=offset,
                has_cameras=first["has_cameras"], name="+".join(ds["name"] for ds in datasets))


def item_labels(items):
    """(pids, camids) int64 arrays of a list of (path, pid, camid) items."""
    labels = np.array([(pid, camid) for _, pid, camid in items], dtype=np.int64).reshape(-1, 2)
    return labels[:, 0], labels[:, 1]


def describe_dataset(dataset):
    """A small table of images, identities and cameras per split."""
    lines = [f'{dataset["name"]:<16} {"images":>8} {"ids":>6} {"cameras":>8}']
    for split in ("train", "query", "gallery"):
        items = dataset[split]
        pids = {pid for _, pid, _ in items}
        cams = len({camid for _, _, camid in items}) if dataset["has_cameras"] else "-"
        distractors = sum(pid == 0 for _, pid, _ in items) if split != "train" else 0
        note = f"  (incl. {distractors} distractor images, pid 0)" if distractors else ""
        lines.append(f'  {split:<14} {len(items):>8} {len(pids - {0} if split != "train" else pids):>6} '
                     f'{cams:>8}{note}')
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Images


def load_image(path):
    """Decode an image file to RGB PIL; DataError naming the path if it is missing or corrupt."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e} (python data.py check ROOT --dataset NAME "
                        f"lists every bad file)") from None


class ImageDataset(Dataset):
    """(path, pid, camid) items -> (image tensor [3, H, W], pid, camid).

    With mock_size (H, W), a training set: items -> (image, pid, camid, is_real), and index len(items) + i is a
    mock of item i: an all-zero [3, H, W] image (zero after normalisation, as the original's mocks) carrying
    item i's pid and camid, with is_real False."""

    def __init__(self, items, transform, mock_size=None):
        self.items = list(items)
        self.transform = transform
        self.mock_size = mock_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        index, seed = split_item(item)  # an index, or (index, augmentation seed) from SeededBatches
        real = index < len(self.items)
        path, pid, camid = self.items[index if real else index - len(self.items)]
        if self.mock_size is None:
            return self._transformed(path, seed), pid, camid
        image = self._transformed(path, seed) if real else torch.zeros(3, *self.mock_size)
        return image, pid, camid, real

    def _transformed(self, path, seed):
        """The transformed image; with a seed, the transform's draws come from it alone (not from this process's
        stream, which differs between 0 and N loader workers and restarts with every run)."""
        if seed is None:
            return self.transform(load_image(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(load_image(path))


class MarkedImages(Dataset):
    """(path, pid, camid) items -> (image tensor [3, H, W], item position, 1), transformed as an EmbedSpec says and
    read under an UnreadableImages policy. A file the policy skips gives (zeros, position, 0): a batch's pid and
    camid columns then say which rows to leave out (evaluation and retrieve drop them); a file it does not skip
    raises the policy's DataError."""

    def __init__(self, items, spec, unreadable):
        self.paths, self.size, self.unreadable = [item[0] for item in items], tuple(spec.size), unreadable
        self.transform = build_test_transform(spec.size, spec.pixel_mean, spec.pixel_std)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, position):
        path = self.paths[position]
        image = self.unreadable.read(path, lambda: self.transform(load_image(path)))
        if image is None:
            return torch.zeros(3, *self.size), position, 0
        return image, position, 1


# ----------------------------------------------------------------------------------------------
# Loaders


def _pin_memory():
    """Pin host memory only when an accelerator will read it (pinning on a CPU-only run warns), i.e. not for one
    whose tensors live on the CPU (utils.tensor_device: a stand-in without kernels)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:
        return torch.cuda.is_available()
    return bool(accelerator.is_available()) and utils.tensor_device(accelerator.current_accelerator()).type != "cpu"


def build_train_loader(items, spec, rank=0, world_size=1, with_is_real=False):
    """PK-sampled training loader of a LoaderSpec on rank of world_size -> (loader, sampler); call
    sampler.set_epoch(e) each epoch.

    Batches are (images, pids, camids); with with_is_real=True (images, pids, camids, is_real [B] bool), is_real
    all True when spec.batch.use_resampling, False on the mock images otherwise (see PKSampler)."""
    batch_sampler = train_sampler(items, spec.batch, rank, world_size, with_is_real)
    size = spec.augment.size
    dataset = ImageDataset(items, build_train_transform(spec.augment), mock_size=tuple(size) if with_is_real else None)
    num_workers = usable_workers(spec.num_workers)
    # each image's augmentation seed comes with its index (SeededBatches); the generator only keeps the workers'
    # own seeds from drawing on the global stream
    loader = DataLoader(dataset, batch_sampler=SeededBatches(batch_sampler), num_workers=num_workers,
                        pin_memory=_pin_memory(), persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(spec.batch.seed))
    return loader, batch_sampler


def build_test_loader(items, spec, unreadable=None):
    """Loader of an EmbedSpec in the items' order (no shuffle) with the test transform: batches of (images, pids,
    camids); with an UnreadableImages policy, MarkedImages' (images, positions, readable) instead."""
    if unreadable is None:
        dataset = ImageDataset(items, build_test_transform(spec.size, spec.pixel_mean, spec.pixel_std))
    else:
        dataset = MarkedImages(items, spec, unreadable)
    num_workers = usable_workers(spec.num_workers)
    return DataLoader(dataset, batch_size=spec.batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=_pin_memory(), persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------------------------
# Check and the command line


def check_dataset(root, name):
    """Print each split's counts, decode every image and list the bad ones; returns their number."""
    ds = read_dataset(name, root)
    print(describe_dataset(ds))
    paths = dataset_paths(ds)
    bad = find_bad_images(paths)  # the check train.py runs before the first step
    for path, why in bad:
        print(f"cannot read image {path}: {why}")
    print(f"{len(paths)} images decoded, {len(bad)} bad")
    return len(bad)


@utils.command
def main(argv=None):
    """The data CLI: synthesize, check, sampler-stats; returns the exit code (2 and one `error: ...` line for bad
    input, 1 when the check found bad images)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("synthesize", help="write the synthetic data set (Market-1501 layout)")
    p.add_argument("out")
    p.add_argument("--ids", type=int, default=120, help="identities, half train, half query/gallery")
    p.add_argument("--images-per-id", type=int, default=16, help="mean images per identity")
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("check", help="counts per split; decode every image and list bad ones")
    p.add_argument("root")
    p.add_argument("--dataset", required=True, help=f'one of {", ".join(DATASETS)}')
    p = commands.add_parser("sampler-stats", help="per epoch: steps, images and identities used, co-batching")
    p.add_argument("root", nargs="?", help="data root (or --simulate)")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--simulate", choices=sorted(SIMULATED), help="a label list of that size instead of ROOT")
    p.add_argument("--sampler", choices=SAMPLERS, help="one sampler (default: both)")
    p.add_argument("--ids", type=int, default=16, help="identities per batch P (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--instances", type=int, default=4, help="images per identity K (DATALOADER.NUM_INSTANCE)")
    p.add_argument("--world-size", type=int, default=1, help="devices (ranks) sharing each step")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-last", action="store_true", help="drop_last=False: a last, smaller step")
    args = parser.parse_args(argv)
    if args.command == "sampler-stats" and (args.root is None) == (args.simulate is None):
        parser.error("sampler-stats: give ROOT or --simulate NAME (one of them)")
    if args.command == "synthesize":
        start = time.perf_counter()
        counts = synthesize(args.out, args.ids, args.images_per_id, args.cameras, tuple(args.size), args.seed)
        print(f"{args.out}: " + ", ".join(f"{sub}/ {n} images" for sub, n in counts.items())
              + f" ({time.perf_counter() - start:.1f} s)")
    elif args.command == "check":
        return 1 if check_dataset(args.root, args.dataset) else 0
    elif args.command == "sampler-stats":
        pids = (simulated_pids(args.simulate) if args.simulate
                else [pid for _, pid, _ in read_dataset(args.dataset, args.root)["train"]])
        batch = BatchSpec(args.ids, args.instances, drop_last=not args.keep_last, seed=args.seed)
        print_sampler_statistics(pids, batch, [args.sampler] if args.sampler else SAMPLERS, args.epochs,
                                 args.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
