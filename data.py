"""Data: data-set readers, the PK identity sampler, transforms, loaders and a synthetic data set.

    python data.py synthesize data/synthetic                  # write the synthetic data set
    python data.py check data --dataset dukemtmcreid          # counts per split, decode every image
    python data.py throughput data --dataset synthetic --workers 0 2
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
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
MARKET_SPLITS = (('train', 'bounding_box_train'), ('query', 'query'), ('gallery', 'bounding_box_test'))
MSMT_LISTS = (('train', 'list_train.txt'), ('train', 'list_val.txt'),
              ('query', 'list_query.txt'), ('gallery', 'list_gallery.txt'))


class DataError(Exception):
    """Bad input data: the message names the path and what was expected."""

    def __init__(self, message):
        # A loader worker's DataError is re-raised in the main process as DataError('Caught DataError
        # in DataLoader worker ... Original Traceback ... data.DataError: <message>'): keep the message,
        # bad data needs no traceback.
        if 'Original Traceback' in message and 'DataError: ' in message:
            message = message.rsplit('DataError: ', 1)[1].strip()
        super().__init__(message)


# ----------------------------------------------------------------------------------------------
# Data-set folders


def _listing(folder, limit=8):
    """A short 'a/, b.txt, ...' listing of a folder for error messages."""
    names = sorted(os.listdir(folder))
    shown = [n + '/' if os.path.isdir(os.path.join(folder, n)) else n for n in names[:limit]]
    more = f', ... ({len(names)} entries)' if len(names) > limit else ''
    return (', '.join(shown) + more) if names else 'nothing (empty folder)'


def _require(path, what, kind='dir'):
    """Raise DataError unless `path` exists; say what the parent folder holds instead."""
    ok = os.path.isdir(path) if kind == 'dir' else os.path.isfile(path)
    if not ok:
        parent = os.path.dirname(path) or '.'
        raise DataError(f'{what}: expected {path}{"/" if kind == "dir" else ""} but it is missing; '
                        f'{parent} holds: {_listing(parent)}')
    return path


def find_dataset_folder(name, root):
    """The data set folder of `name`: ROOT itself if it holds the layout, else ROOT/<known folder>."""
    spec = DATASETS[name]
    if not os.path.isdir(root):
        raise DataError(f'data root {root} does not exist (--DATASETS.ROOT_DIR: the folder holding '
                        f'{spec["folders"][0]}/ or that folder itself)')
    if name == 'folder' or any(os.path.exists(os.path.join(root, p)) for p in spec['parts']):
        return root
    by_lower = {n.lower(): n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))}
    for folder in spec['folders']:
        if folder.lower() in by_lower:
            return os.path.join(root, by_lower[folder.lower()])
    expected = ' or '.join(f'{root}/{f}/' for f in spec['folders'])
    hint = f'; write it with: python data.py synthesize {root}/synthetic' if name == 'synthetic' else ''
    raise DataError(f'no {name} data set in {root}: expected {expected} holding '
                    f'{", ".join(spec["parts"])}, or {root} itself holding them; '
                    f'{root} holds: {_listing(root)}{hint}')


# ----------------------------------------------------------------------------------------------
# Readers. Each returns {'train', 'query', 'gallery'} with data-set pids, and has_cameras.


def _market_split(folder, sub, pattern, example):
    """(path, pid, camid) of every image in folder/sub named by `pattern`; junk (pid -1) dropped."""
    directory = _require(os.path.join(folder, sub), f'{sub}/ of {folder}')
    files = sorted(f for f in os.listdir(directory) if f.lower().endswith('.jpg'))
    if not files:
        raise DataError(f'{directory} holds no .jpg images (holds: {_listing(directory)})')
    items = []
    for file in files:
        match = pattern.fullmatch(file)
        if match is None:
            raise DataError(f'{os.path.join(directory, file)}: the file name does not match '
                            f'{pattern.pattern} (a name that would: {example})')
        pid, cam = int(match.group(1)), int(match.group(2))
        if cam < 1:
            raise DataError(f'{os.path.join(directory, file)}: cameras are numbered from c1')
        if pid != -1:
            items.append((os.path.join(directory, file), pid, cam - 1))
    return items


def read_market_style(folder, pattern, example):
    """Market-1501 / DukeMTMC-reID layout: bounding_box_train/, query/, bounding_box_test/.

    The file name gives the pid and the 1-based camera (`pattern` groups 1 and 2), e.g. Market
    `0002_c1s1_000451_03.jpg`, Duke `0005_c2_f0046985.jpg`. pid -1 (junk) is dropped everywhere,
    pid 0 (distractor) is kept in the gallery only."""
    splits = {split: _market_split(folder, sub, pattern, example) for split, sub in MARKET_SPLITS}
    splits['train'] = [item for item in splits['train'] if item[1] != 0]
    splits['query'] = [item for item in splits['query'] if item[1] != 0]
    return splits, True


def _msmt_camera(path):
    """1-based camera of an MSMT17 file name -> 0-based: `_c03_` if present, else the third
    underscore field (the official `0000_000_01_0303morning_0015_0.jpg`: camera 01)."""
    name = os.path.basename(path)
    match = re.search(r'_c(\d+)', name)
    fields = name.split('_')
    if match is None and (len(fields) < 3 or not fields[2].isdigit()):
        raise DataError(f'{path}: no camera in the file name (expected e.g. '
                        f'0000_000_01_0303morning_0015_0.jpg, camera 01)')
    return int(match.group(1) if match else fields[2]) - 1


def read_msmt17(folder):
    """MSMT17 list files `relative/path pid`: train = list_train.txt + list_val.txt (same pid
    space, as the community trains), query/gallery = list_query.txt / list_gallery.txt. Paths are
    relative to train/ and test/ (V1), mask_train_v2/ and mask_test_v2/ (V2) or the folder itself.
    The camera comes from the file name (1-based -> 0-based, see _msmt_camera). Test pids start at
    0 in the lists and are shifted by +1 here, since pid 0 means "distractor" to the evaluator."""
    splits = {'train': [], 'query': [], 'gallery': []}
    for split, list_name in MSMT_LISTS:
        list_path = _require(os.path.join(folder, list_name), 'MSMT17 list file', kind='file')
        with open(list_path) as f:
            rows = [line.split() for line in f if line.strip()]
        if not rows:
            raise DataError(f'{list_path} is empty (expected lines of "relative/path pid")')
        bad = next((i for i, r in enumerate(rows) if len(r) != 2 or not r[1].lstrip('-').isdigit()), None)
        if bad is not None:
            raise DataError(f'{list_path} line {bad + 1}: expected "relative/path pid", '
                            f'got {" ".join(rows[bad])!r}')
        subs = ('train', 'mask_train_v2', '') if split == 'train' else ('test', 'mask_test_v2', '')
        base = next((os.path.join(folder, s) for s in subs
                     if os.path.isfile(os.path.join(folder, s, rows[0][0]))), None)
        if base is None:
            raise DataError(f'{list_path} line 1: image {rows[0][0]} not found under '
                            f'{", ".join(os.path.join(folder, s) for s in subs)}')
        shift = 0 if split == 'train' else 1
        splits[split] += [(os.path.join(base, p), int(pid) + shift, _msmt_camera(p)) for p, pid in rows]
    return splits, True


def _coco_json_paths(folder, json_train_path=''):
    """train/query/gallery JSON files: `json_train_path` (DATASETS.JSON_TRAIN_PATH) or `train*.json` in the
    folder (`train.json` preferred); query and gallery are named like it with 'train' replaced in the file
    name (the original's rule: train_128_256.json -> query_128_256.json, gallery_128_256.json)."""
    if json_train_path:
        _require(json_train_path, 'DATASETS.JSON_TRAIN_PATH (the train annotations)', kind='file')
        folder, train = os.path.split(json_train_path)
        if 'train' not in train:
            raise DataError(f'DATASETS.JSON_TRAIN_PATH {json_train_path}: the file name must contain "train" '
                            '(query and gallery files are named by replacing it)')
    else:
        candidates = sorted(f for f in os.listdir(folder) if f.startswith('train') and f.endswith('.json'))
        if not candidates:
            raise DataError(f'{folder} holds no train*.json annotation file (expected train.json, '
                            f'query.json, gallery.json; holds: {_listing(folder)}); or set DATASETS.JSON_TRAIN_PATH')
        if len(candidates) > 1 and 'train.json' not in candidates:
            raise DataError(f'{folder} holds several train*.json files ({", ".join(candidates)}): keep one, '
                            'or name it with DATASETS.JSON_TRAIN_PATH')
        train = 'train.json' if 'train.json' in candidates else candidates[0]
    return {split: _require(os.path.join(folder, train.replace('train', split, 1)),
                            f'{split} annotations', kind='file') for split in ('train', 'query', 'gallery')}


def _read_coco_split(json_path, image_dir):
    """(path, pair_id) per annotation of a COCO-style file (`images`: id, file_name;
    `annotations`: image_id, pair_id, source)."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f'{json_path}: not a readable JSON file ({e})') from None
    if not isinstance(coco, dict) or 'images' not in coco or 'annotations' not in coco:
        raise DataError(f'{json_path}: expected a COCO-style object with "images" and "annotations"')
    try:
        file_names = {image['id']: image['file_name'] for image in coco['images']}
    except (KeyError, TypeError):
        raise DataError(f'{json_path}: every entry of "images" needs "id" and "file_name"') from None
    items = []
    for i, ann in enumerate(coco['annotations']):
        if 'pair_id' not in ann:
            raise DataError(f'{json_path}: annotation {i} has no "pair_id" (keys: {", ".join(ann)}); '
                            f'each annotation needs image_id, pair_id and source (user/shop)')
        if ann.get('image_id') not in file_names:
            raise DataError(f'{json_path}: annotation {i} refers to image_id {ann.get("image_id")!r}, '
                            f'which is not in "images"')
        if not isinstance(ann['pair_id'], int) or ann['pair_id'] < 0:
            raise DataError(f'{json_path}: annotation {i} has pair_id {ann["pair_id"]!r}, expected an int >= 0')
        items.append((os.path.join(image_dir, file_names[ann['image_id']]), ann['pair_id']))
    return items


def read_coco(folder, json_train_path=''):
    """Fashion retrieval (DeepFashion consumer-to-shop `df1`, `street2shop`), the original's layout:
    train/, query/, gallery/ image folders and train.json, query.json, gallery.json beside them.
    No cameras: query cam 0, gallery cam 1 (train cam 0). Train pair_ids with fewer than 2 images
    are dropped; query/gallery pids are pair_id + 1, since pid 0 means "distractor"."""
    jsons = _coco_json_paths(folder, json_train_path)
    splits = {}
    for split, camid in (('train', 0), ('query', 0), ('gallery', 1)):
        image_dir = _require(os.path.join(folder, split), f'{split} images')
        pairs = _read_coco_split(jsons[split], image_dir)
        shift = 0 if split == 'train' else 1
        splits[split] = [(path, pair_id + shift, camid) for path, pair_id in pairs]
    pair_ids, counts = np.unique([pid for _, pid, _ in splits['train']], return_counts=True)
    keep = set(pair_ids[counts >= 2].tolist())
    splits['train'] = [item for item in splits['train'] if item[1] in keep]
    return splits, False


def read_folder(folder):
    """Users' own data: ROOT/{train,query,gallery}/<identity>/<image>. The camera is `_c<N>` in the
    file name when every file has one (distinct N mapped in sorted order to 0..C-1), else the data is
    camera-agnostic (query cam 0, gallery cam 1). Query/gallery identities get pids 1..M by sorted name."""
    named = {}
    for split in ('train', 'query', 'gallery'):
        directory = _require(os.path.join(folder, split), f'{split} identities')
        named[split] = []
        for entry in sorted(os.listdir(directory)):
            identity_dir = os.path.join(directory, entry)
            if not os.path.isdir(identity_dir):
                if entry.lower().endswith(IMAGE_EXTENSIONS):
                    raise DataError(f'{identity_dir}: images go into {directory}/<identity>/, one '
                                    f'folder per identity (e.g. {directory}/0001/{entry})')
                continue
            named[split] += [(os.path.join(identity_dir, f), entry) for f in sorted(os.listdir(identity_dir))
                             if f.lower().endswith(IMAGE_EXTENSIONS)]
    all_files = [path for items in named.values() for path, _ in items]
    cams = [re.search(r'_c(\d+)', os.path.basename(p)) for p in all_files]
    has_cameras = bool(all_files) and all(c is not None for c in cams)
    if not has_cameras and any(c is not None for c in cams):
        without = next(p for p, c in zip(all_files, cams) if c is None)
        raise DataError(f'{without} has no _c<N> camera in its name while other files have one: '
                        f'name every file with a camera (e.g. img_c1_0001.jpg) or none')
    cam_of = {}
    if has_cameras:
        cam_ids = sorted({int(c.group(1)) for c in cams})
        cam_of = {p: cam_ids.index(int(c.group(1))) for p, c in zip(all_files, cams)}
    test_names = sorted({name for split in ('query', 'gallery') for _, name in named[split]})
    test_pid = {name: i + 1 for i, name in enumerate(test_names)}
    train_pid = {name: i for i, name in enumerate(sorted({name for _, name in named['train']}))}
    splits = {}
    for split, default_cam in (('train', 0), ('query', 0), ('gallery', 1)):
        pid_of = train_pid if split == 'train' else test_pid
        splits[split] = [(p, pid_of[name], cam_of.get(p, default_cam)) for p, name in named[split]]
    return splits, has_cameras


# canonical name -> reader, data set folder names tried under ROOT, layout parts, accepted spellings
MARKET_PATTERN = re.compile(r'(-?\d+)_c(\d+)s\d+_\d+_\d+\.jpg')
DUKE_PATTERN = re.compile(r'(-?\d+)_c(\d+)_f\d+\.jpg')
_MARKET_PARTS = tuple(sub for _, sub in MARKET_SPLITS)
_COCO_PARTS = ('train', 'query', 'gallery', 'train.json')
DATASETS = {
    'market1501': dict(read=lambda f: read_market_style(f, MARKET_PATTERN, '0002_c1s1_000451_03.jpg'),
                       folders=('Market-1501-v15.09.15', 'market1501', 'Market-1501'), parts=_MARKET_PARTS,
                       aliases=('market-1501-v15.09.15', 'market-1501', 'market')),
    'dukemtmcreid': dict(read=lambda f: read_market_style(f, DUKE_PATTERN, '0005_c2_f0046985.jpg'),
                         folders=('DukeMTMC-reID', 'dukemtmcreid'), parts=_MARKET_PARTS,
                         aliases=('dukemtmc-reid', 'dukemtmc', 'duke')),
    'msmt17': dict(read=read_msmt17, folders=('MSMT17', 'MSMT17_V1', 'MSMT17_V2'),
                   parts=tuple(f for _, f in MSMT_LISTS), aliases=('msmt17_v1', 'msmt17_v2', 'msmt')),
    'df1': dict(read=read_coco, folders=('df1', 'deepfashion', 'consumer_to_shop'), parts=_COCO_PARTS,
                aliases=('deepfashion', 'deep_fashion')),
    'street2shop': dict(read=read_coco, folders=('street2shop',), parts=_COCO_PARTS, aliases=()),
    'folder': dict(read=read_folder, folders=('.',), parts=('train', 'query', 'gallery'), aliases=()),
    'synthetic': dict(read=lambda f: read_market_style(f, MARKET_PATTERN, '0002_c1s1_000451_03.jpg'),
                      folders=('synthetic',), parts=_MARKET_PARTS, aliases=()),
}
ALIASES = {alias: name for name, spec in DATASETS.items() for alias in (name,) + spec['aliases']}


def canonical_name(name):
    """The canonical data set name of a spelling (case-insensitive, e.g. DukeMTMC-reID -> dukemtmcreid)."""
    key = name.strip().lower()
    if key not in ALIASES:
        raise DataError(f'unknown data set {name!r}: use one of {", ".join(DATASETS)}')
    return ALIASES[key]


def read_dataset(name, root, json_train_path=''):
    """Read one data set: {'train', 'query', 'gallery', 'num_train_pids', 'has_cameras', 'name'}.

    json_train_path (df1, street2shop) names the train JSON as the original's DATASETS.JSON_TRAIN_PATH does;
    ROOT is then the folder of the train/, query/ and gallery/ images."""
    name = canonical_name(name)
    if json_train_path:
        if DATASETS[name]['read'] is not read_coco:
            raise DataError(f'DATASETS.JSON_TRAIN_PATH is for the COCO-style sets (df1, street2shop), not {name}: '
                            'leave it empty')
        folder = _require(root, 'DATASETS.ROOT_DIR (the image folder)')
        splits, has_cameras = read_coco(folder, json_train_path)
    else:
        folder = find_dataset_folder(name, root)
        splits, has_cameras = DATASETS[name]['read'](folder)
    for split, items in splits.items():
        if not items:
            raise DataError(f'the {split} split of {name} in {folder} is empty (after dropping junk '
                            f'pid -1{", distractors pid 0" if split != "gallery" else ""}'
                            f'{" and pair_ids with one image" if DATASETS[name]["read"] is read_coco else ""})')
    train_pids = sorted({pid for _, pid, _ in splits['train']})
    relabel = {pid: label for label, pid in enumerate(train_pids)}
    train = [(path, relabel[pid], camid) for path, pid, camid in splits['train']]
    return dict(train=train, query=splits['query'], gallery=splits['gallery'],
                num_train_pids=len(train_pids), has_cameras=has_cameras, name=name)


def build_datasets(names, root, json_train_path=''):
    """Train on the union of `names` (pids offset per set); query/gallery/has_cameras of the first."""
    if isinstance(names, str):
        names = [n for n in names.replace(',', ' ').split() if n]
    if not names:
        raise DataError('no data set name given (--DATASETS.NAMES)')
    datasets = [read_dataset(name, root, json_train_path) for name in names]
    train, offset = [], 0
    for ds in datasets:
        train += [(path, pid + offset, camid) for path, pid, camid in ds['train']]
        offset += ds['num_train_pids']
    first = datasets[0]
    return dict(train=train, query=first['query'], gallery=first['gallery'], num_train_pids=offset,
                has_cameras=first['has_cameras'], name='+'.join(ds['name'] for ds in datasets))


def item_labels(items):
    """(pids, camids) int64 arrays of a list of (path, pid, camid) items."""
    labels = np.array([(pid, camid) for _, pid, camid in items], dtype=np.int64).reshape(-1, 2)
    return labels[:, 0], labels[:, 1]


def describe_dataset(dataset):
    """A small table of images, identities and cameras per split."""
    lines = [f'{dataset["name"]:<16} {"images":>8} {"ids":>6} {"cameras":>8}']
    for split in ('train', 'query', 'gallery'):
        items = dataset[split]
        pids = {pid for _, pid, _ in items}
        cams = len({camid for _, _, camid in items}) if dataset['has_cameras'] else '-'
        distractors = sum(pid == 0 for _, pid, _ in items) if split != 'train' else 0
        note = f'  (incl. {distractors} distractor images, pid 0)' if distractors else ''
        lines.append(f'  {split:<14} {len(items):>8} {len(pids - {0} if split != "train" else pids):>6} '
                     f'{cams:>8}{note}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Images, transforms


def load_image(path):
    """Decode an image file to RGB PIL; DataError naming the path if it is missing or corrupt."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f'cannot read image {path}: {e} (python data.py check ROOT --dataset NAME '
                        f'lists every bad file)') from None


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

    def __getitem__(self, index):
        real = index < len(self.items)
        path, pid, camid = self.items[index if real else index - len(self.items)]
        if self.mock_size is None:
            return self.transform(load_image(path)), pid, camid
        image = self.transform(load_image(path)) if real else torch.zeros(3, *self.mock_size)
        return image, pid, camid, real


def random_erasing_boxes(batch, height, width, device, prob=0.5, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3),
                         tries=100):
    """Per image: whether to erase and the box (top, left, h, w), drawn as the original's RandomErasing: with
    probability prob, up to `tries` draws of an area (uniform in scale x H*W) and an aspect h/w (uniform in
    ratio); the first box that fits (h < H, w < W) wins, none -> no erasing; top and left are uniform."""
    area = height * width * torch.empty(batch, tries, device=device).uniform_(*scale)          # [B, T]
    aspect = torch.empty(batch, tries, device=device).uniform_(*ratio)                          # [B, T]
    h = torch.sqrt(area * aspect).round().long()  # round half to even, as Python's round()
    w = torch.sqrt(area / aspect).round().long()
    fits = (h < height) & (w < width)                                                           # [B, T]
    first = fits.long().argmax(dim=1, keepdim=True)                                             # [B, 1]
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]                                   # [B]
    erase = (torch.rand(batch, device=device) < prob) & fits.any(dim=1)
    top = (torch.rand(batch, device=device) * (height - h + 1)).long()
    left = (torch.rand(batch, device=device) * (width - w + 1)).long()
    return erase, top, left, h, w


class RandomErasing:
    """Random erasing of one normalised [C, H, W] image as the original's: the box of random_erasing_boxes is
    filled with `value` per channel, the original's INPUT.PIXEL_MEAN written into the normalised tensor."""

    def __init__(self, prob=0.5, value=IMAGENET_MEAN):
        self.prob, self.value = prob, tuple(value)

    def __call__(self, image):
        _, height, width = image.shape
        erase, top, left, h, w = (int(v) for v in random_erasing_boxes(1, height, width, image.device, self.prob))
        if erase:
            value = torch.tensor(self.value, dtype=image.dtype, device=image.device)[:, None, None]
            image[:, top:top + h, left:left + w] = value
        return image


def build_train_transform(size=(256, 128), flip_prob=0.5, padding=10, re_prob=0.5, pixel_mean=IMAGENET_MEAN,
                          pixel_std=IMAGENET_STD):
    """Resize, flip, pad + random crop, normalisation by pixel_mean / pixel_std, the original's random erasing."""
    return v2.Compose([
        v2.ToImage(),  # uint8 tensor: the geometric ops below are cheaper on it than on PIL
        v2.Resize(list(size), antialias=True),
        v2.RandomHorizontalFlip(flip_prob),
        v2.Pad(padding),
        v2.RandomCrop(list(size)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(pixel_mean), list(pixel_std)),
        RandomErasing(re_prob, pixel_mean),
    ])


def build_test_transform(size=(256, 128), pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
    """Resize + normalisation by pixel_mean / pixel_std."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(list(size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(pixel_mean), list(pixel_std)),
    ])


# ----------------------------------------------------------------------------------------------
# The PK identity sampler

SAMPLERS = ('random_identity', 'balanced')


def describe_batch(num_ids, num_instances, world_size=1):
    """'P identities × K images = B images per device' (and the total over devices)."""
    text = f'{num_ids} identities × {num_instances} images = {num_ids * num_instances} images per device'
    if world_size > 1:
        text += f' ({world_size} devices: {num_ids * num_instances * world_size} images per step)'
    return text


def identity_chunks(counts, num_instances):
    """Chunks of K images per identity in an epoch (numpy [I]), by the original's leftover rule: a single
    leftover image (n mod K = 1) is dropped, a longer remainder makes a last chunk that is filled up to K."""
    usable = counts - (counts % num_instances == 1)
    return -(-usable // num_instances)


def random_identity_steps(chunks, per_step, rng):
    """The original's draw: each step takes per_step identities uniformly at random, in random order, among the
    identities with chunks left; the epoch ends when fewer than per_step have chunks left.
    chunks: numpy [I] -> identity indices, numpy [steps, per_step].

    Why a sweep over the steps rather than one sort of random keys: per-identity keys (an exponential race, the
    k-th key of an identity a Gamma(k) time) reproduce the draw of one identity at a time, but with per_step > 1
    the original never takes an identity twice in a step, i.e. an identity drawn in a step waits until the
    step's end, the time of its per_step-th draw, which depends on every identity's keys. Already with 3
    identities (2, 1, 1 chunks, 2 per step) independent keys cannot give both that rule and uniform steps, and
    the fixed-point forms of the coupling (on step end times, or on the step each identity runs out) settle only
    ~18 steps per pass. This sweep is exact and does O(identities) numpy work per step: a Market-1501 epoch
    plans in ~10 ms, an MSMT17-sized one (4,101 identities, 2,000 steps) in ~0.1 s."""
    left = chunks.copy()
    available = np.flatnonzero(left)
    steps = []
    while len(available) >= per_step:
        picked = available[rng.choice(len(available), per_step, replace=False)]
        steps.append(picked)
        left[picked] -= 1
        if not left[picked].all():
            available = available[left[available] > 0]
    return np.array(steps, dtype=np.int64).reshape(-1, per_step)


def balanced_steps(chunks, per_step, steps, rng):
    """The column layout (sampler 'balanced'): the chunks of identities in random order, one identity after
    the other, dealt column by column into `steps` steps, so that an identity's chunks (never more than steps)
    land in distinct, consecutive steps; the steps are then shuffled. -> identity indices, numpy [steps, per_step]."""
    identity_order = rng.permutation(len(chunks))  # [I]
    ids = np.repeat(identity_order, chunks[identity_order])[: steps * per_step]
    grid = ids.reshape(per_step, steps).T  # [steps, per_step]
    return grid[rng.permutation(steps)]


def occurrence_index(ids):
    """For each entry of ids (numpy [T]), how many earlier entries hold the same value (its chunk number)."""
    order = np.argsort(ids, kind='stable')
    sorted_ids = ids[order]
    run_start = np.ones(len(ids), dtype=bool)
    run_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    positions = np.arange(len(ids))
    first = np.maximum.accumulate(np.where(run_start, positions, 0))
    index = np.empty_like(ids)
    index[order] = positions - first
    return index


class PKSampler:
    """Batch sampler: each batch is P distinct identities x K images, identity-major (K consecutive indices
    per identity). An epoch is a pure function of (seed, epoch): each identity's images are shuffled and cut
    into chunks of K (identity_chunks: a single leftover image is dropped), and the chunks are drawn into steps
    of W*P distinct identities; rank r of W takes columns r*P..r*P+P-1 of every step, so ranks are disjoint at
    every step and run the same number of steps.

    sampler: 'random_identity' (the original's DATALOADER.SAMPLER, default): each step draws its identities
    uniformly among those with chunks left (random_identity_steps), so neighbours change from step to step;
    the chunks of the last < W*P identities are left out. 'balanced': the column layout of balanced_steps,
    which leaves out fewer than W*P chunks but keeps an identity beside the same neighbours.
    use_resampling (DATALOADER.USE_RESAMPLING): a short last chunk is filled with the identity's own other
    images (True), or with mock images (False): index len(pids) + i stands for a mock of image i (an all-zero
    image with its pid, see ImageDataset), to be masked out of the losses with is_real.
    drop_last (DATALOADER.DROP_LAST): the original hands it to its DataLoader, whose batches of P identities
    are always whole with its sampler, so it changes nothing there; True is that. False adds one last,
    smaller step: one chunk of each identity that still has chunks (split over the ranks; left out when there
    are fewer such identities than ranks)."""

    def __init__(self, pids, num_ids, num_instances=4, seed=0, rank=0, world_size=1, sampler='random_identity',
                 use_resampling=True, drop_last=True):
        if num_instances < 2:
            raise DataError(f'DATALOADER.NUM_INSTANCE (K) = {num_instances}: need K >= 2 images per identity')
        if num_ids < 1 or not 0 <= rank < world_size:
            raise DataError(f'bad sampler settings: P = {num_ids}, rank {rank} of world size {world_size}')
        if sampler not in SAMPLERS:
            raise DataError(f'unknown sampler {sampler!r} (DATALOADER.SAMPLER): use one of {", ".join(SAMPLERS)}')
        self.num_ids, self.num_instances, self.sampler = num_ids, num_instances, sampler
        self.use_resampling, self.drop_last = use_resampling, drop_last
        self.seed, self.rank, self.world_size, self.epoch, self.start_step = seed, rank, world_size, 0, 0
        # planning is numpy (single-threaded): multi-threaded CPU tensor ops stall on a busy host
        self.pids = np.asarray(pids, dtype=np.int64).reshape(-1)
        _, self.identity, self.counts = np.unique(self.pids, return_inverse=True, return_counts=True)
        self.identity = self.identity.reshape(-1)
        self.chunks, self.steps = self._chunks_and_steps()
        self._cached = None  # ((seed, epoch), full steps [S, W*P, K], last smaller step [n, K] or None)

    def _chunks_and_steps(self):
        """Chunks per identity; for 'balanced' also the steps, so that no identity has more chunks than steps."""
        per_step = self.num_ids * self.world_size
        chunks = identity_chunks(self.counts, self.num_instances)  # [I]
        if int((chunks > 0).sum()) < per_step:
            possible = int((chunks > 0).sum()) // self.world_size
            raise DataError(
                f'{describe_batch(self.num_ids, self.num_instances, self.world_size)} needs {per_step} identities '
                f'per step, but the training set has {int((chunks > 0).sum())} identities with 2 images or more '
                f'({len(self.pids)} images): use --SOLVER.IMS_PER_BATCH <= {possible}'
                f'{f" with {self.world_size} devices" if self.world_size > 1 else ""}')
        steps = int(chunks.sum()) // per_step
        while self.sampler == 'balanced' and int(chunks.max()) > steps:  # cap a very large identity (few rounds)
            chunks = np.minimum(chunks, steps)
            steps = int(chunks.sum()) // per_step
        return chunks, steps

    def set_epoch(self, epoch, start_step=0):
        """Select the epoch (call before iterating, as with DistributedSampler); a resumed run starts
        at start_step of it without loading the batches it already trained on."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self):
        """What a resumed run needs to continue the same sequence of epochs."""
        return {'seed': self.seed, 'epoch': self.epoch}

    def load_state_dict(self, state):
        """Restore seed and epoch from state_dict()."""
        self.seed, self.epoch = int(state['seed']), int(state['epoch'])

    def __len__(self):
        full, last = self._plan()
        return len(full) + (last is not None)

    def _identity_steps(self, rng):
        """This epoch's identity indices [steps, W*P] and the identities that still have chunks after them."""
        per_step = self.num_ids * self.world_size
        if self.sampler == 'balanced':
            steps = balanced_steps(self.chunks, per_step, self.steps, rng)
        else:
            steps = random_identity_steps(self.chunks, per_step, rng)
        used = np.bincount(steps.reshape(-1), minlength=len(self.chunks))
        return steps, rng.permutation(np.flatnonzero(self.chunks > used))

    def _plan(self):
        """This epoch's dataset indices for all ranks: full steps [S, W*P, K], last smaller step [n, K] or None."""
        key = (self.seed, self.epoch)
        if self._cached is None or self._cached[0] != key:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            steps, unfinished = self._identity_steps(rng)
            ids = np.concatenate([steps.reshape(-1), unfinished])  # [T]: one entry per chunk, in the order drawn
            chunks = self._chunk_images(rng, ids, occurrence_index(ids))  # [T, K]
            full = chunks[: steps.size].reshape(*steps.shape, self.num_instances)
            last = chunks[steps.size:]
            keep_last = not self.drop_last and len(last) >= self.world_size
            self._cached = (key, full, last if keep_last else None)
        return self._cached[1:]

    def _chunk_images(self, rng, ids, chunk_index):
        """Dataset indices [T, K] of chunk chunk_index[t] of identity ids[t], in this epoch's image order."""
        K, num_images = self.num_instances, len(self.pids)
        # dataset indices grouped by identity, in random order within each identity
        order = rng.permutation(num_images)
        order = order[np.argsort(self.identity[order], kind='stable')]  # [N]
        starts = np.cumsum(self.counts) - self.counts  # [I]
        positions = chunk_index[:, None] * K + np.arange(K)  # [T, K]
        counts = self.counts[ids][:, None]
        images = order[starts[ids][:, None] + positions % counts]  # past the end: the identity's first images
        if self.use_resampling:
            return images
        return np.where(positions < counts, images, images + num_images)  # mocks of those images

    def epoch_batches(self):
        """This rank's batches of the current epoch: a list of lists of dataset indices (P*K each; the last
        smaller step of drop_last=False may hold fewer identities)."""
        full, last = self._plan()
        P, K = self.num_ids, self.num_instances
        batches = full[:, self.rank * P:(self.rank + 1) * P].reshape(len(full), P * K).tolist()
        if last is not None:
            batches.append(np.array_split(last, self.world_size)[self.rank].reshape(-1).tolist())
        return batches

    def __iter__(self):
        yield from self.epoch_batches()[self.start_step:]


SIMULATED = {'market': (751, 12936), 'msmt17': (4101, 126441)}


def simulated_pids(name, seed=0):
    """A label list the size of a data set, for sampler statistics without the images: 'market' = Market-1501's
    train split (751 identities, 12,936 images), 'msmt17' = all of MSMT17 (4,101 identities, 126,441 images);
    images per identity >= 2, the rest spread with lognormal weights (sigma 0.6)."""
    num_ids, num_images = SIMULATED[name]
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0, 0.6, num_ids)
    counts = 2 + rng.multinomial(num_images - 2 * num_ids, weights / weights.sum())
    return np.repeat(np.arange(num_ids), counts).tolist()


def co_batched_identities(batch_identities, num_identities):
    """Distinct other identities each identity shares a batch with: numpy [num_identities] (0 if unused).
    batch_identities: numpy [batches, P], -1 for an empty place."""
    a, b = batch_identities[:, :, None], batch_identities[:, None, :]
    pairs = (a >= 0) & (b >= 0) & (a != b)  # [batches, P, P]
    codes = np.unique(np.broadcast_to(a * num_identities + b, pairs.shape)[pairs])
    return np.bincount(codes // num_identities, minlength=num_identities)


def sampler_statistics(pids, num_ids, num_instances, sampler, epoch, seed=0, world_size=1, drop_last=True):
    """One epoch of a sampler over all ranks: {'steps', 'images' (distinct images used), 'identities' (used),
    'co_batched' (mean over used identities of co_batched_identities)}."""
    ranks = [PKSampler(pids, num_ids, num_instances, seed, rank, world_size, sampler, drop_last=drop_last)
             for rank in range(world_size)]
    batches = []
    for rank_sampler in ranks:
        rank_sampler.set_epoch(epoch)
        batches += rank_sampler.epoch_batches()
    num_images, num_identities = len(ranks[0].pids), len(ranks[0].counts)
    width = max(len(batch) for batch in batches)
    padded = np.array([batch + [-1] * (width - len(batch)) for batch in batches])  # [batches, P*K]
    firsts = padded[:, ::num_instances]  # [batches, P]: each chunk's first image (a mock: + N)
    places = np.where(firsts >= 0, ranks[0].identity[np.maximum(firsts, 0) % num_images], -1)
    images = padded[(padded >= 0) & (padded < num_images)]
    used = np.zeros(num_identities, dtype=bool)
    used[places[places >= 0]] = True
    co_batched = co_batched_identities(places, num_identities)
    return {'steps': len(ranks[0]), 'images': len(np.unique(images)), 'identities': int(used.sum()),
            'co_batched': float(co_batched[used].mean())}


# ----------------------------------------------------------------------------------------------
# Loaders


def _pin_memory():
    """Pin host memory only when an accelerator will read it (pinning on a CPU-only run warns)."""
    accelerator = getattr(torch, 'accelerator', None)
    return bool(accelerator.is_available()) if accelerator else torch.cuda.is_available()


def _usable_workers(num_workers):
    """No more loader processes than cores: extra ones only compete with the training process."""
    return max(0, min(int(num_workers), os.cpu_count() or 1))


def _train_sampler(items, num_ids, num_instances, seed, rank, world_size, sampler, use_resampling, drop_last,
                   with_is_real):
    """The PKSampler of a train loader; refuses mock images that no is_real would mask."""
    if not use_resampling and not with_is_real:
        raise DataError('use_resampling=False (DATALOADER.USE_RESAMPLING False) pads short identities with mock '
                        'images that the losses must mask: build the loader with with_is_real=True and pass '
                        'is_real to the model and to compute_losses')
    return PKSampler([pid for _, pid, _ in items], num_ids, num_instances, seed, rank, world_size, sampler,
                     use_resampling, drop_last)


def build_train_loader(items, num_ids, num_instances, size, num_workers, seed=0, rank=0, world_size=1,
                       flip_prob=0.5, padding=10, re_prob=0.5, sampler='random_identity', use_resampling=True,
                       drop_last=True, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, with_is_real=False):
    """PK-sampled training loader -> (loader, sampler); call sampler.set_epoch(e) each epoch.

    Batches are (images, pids, camids); with with_is_real=True (images, pids, camids, is_real [B] bool), is_real
    all True when use_resampling, False on the mock images otherwise. sampler, use_resampling, drop_last: see
    PKSampler; pixel_mean / pixel_std: the normalisation (and random erasing's fill)."""
    batch_sampler = _train_sampler(items, num_ids, num_instances, seed, rank, world_size, sampler, use_resampling,
                                   drop_last, with_is_real)
    transform = build_train_transform(size, flip_prob, padding, re_prob, pixel_mean, pixel_std)
    dataset = ImageDataset(items, transform, mock_size=tuple(size) if with_is_real else None)
    num_workers = _usable_workers(num_workers)
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=_pin_memory(),
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed * 1000 + rank))  # worker seeds
    return loader, batch_sampler


def build_test_loader(items, size, batch_size, num_workers, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
    """Loader in the items' order (no shuffle) with the test transform."""
    dataset = ImageDataset(items, build_test_transform(size, pixel_mean, pixel_std))
    num_workers = _usable_workers(num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=_pin_memory(), persistent_workers=num_workers > 0)


# ----------------------------------------------------------------------------------------------
# Decoding and augmentation on the device (--INPUT.DEVICE_AUGMENT): loader workers only read bytes


class EncodedImages(Dataset):
    """(path, pid, camid) items -> (file bytes as a uint8 tensor, pid, camid, index); index len(items) + i
    (a mock of item i, see PKSampler) gives no bytes."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        real = index < len(self.items)
        path, pid, camid = self.items[index if real else index - len(self.items)]
        if not real:
            return torch.empty(0, dtype=torch.uint8), pid, camid, index
        try:
            return torchvision.io.read_file(path), pid, camid, index
        except (OSError, RuntimeError) as err:
            raise DataError(f'{path}: cannot read the file ({err})') from None


def collate_encoded(batch):
    """(all files' bytes in one tensor, lengths [B], pids [B], camids [B], indices [B]): one shared buffer per
    batch (a tensor per image would pass a file descriptor per image between processes)."""
    data, pids, camids, indices = zip(*batch)
    return (torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(pids), torch.tensor(camids),
            torch.tensor(indices))


def augment_batch(images, size, flip_prob=0.5, padding=10, re_prob=0.5, pixel_mean=IMAGENET_MEAN,
                  pixel_std=IMAGENET_STD):
    """build_train_transform on a whole batch on its device: uint8 [3, h, w] list -> float [B, 3, H, W].

    Resize (bilinear, antialiased), flip, zero pad + random crop, normalisation, the original's random erasing
    (filled with pixel_mean): the same draws and distributions as the per-image torchvision pipeline."""
    height, width = size
    device = images[0].device
    resize = lambda x: F.interpolate(x.float(), size=(height, width), mode='bilinear', antialias=True,  # noqa: E731
                                     align_corners=False)
    if all(img.shape == images[0].shape for img in images):  # one kernel for the batch (Market: all 128x64)
        x = resize(torch.stack(images)) / 255  # [B, 3, H, W]
    else:
        x = torch.cat([resize(img[None]) for img in images]) / 255
    batch = len(x)
    flip = torch.rand(batch, device=device) < flip_prob
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # pad + crop = shift by (padding - offset) with zeros coming in; offsets uniform in 0..2*padding
    dy, dx = torch.randint(0, 2 * padding + 1, (2, batch, 1), device=device)
    rows = torch.arange(height, device=device) + dy - padding                               # [B, H]
    cols = torch.arange(width, device=device) + dx - padding                                # [B, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    b = torch.arange(batch, device=device)[:, None, None]
    x = x[b, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]  # [B, H, W, 3]
    x = (x * inside[..., None]).permute(0, 3, 1, 2)
    mean = torch.tensor(pixel_mean, device=device)[:, None, None]
    std = torch.tensor(pixel_std, device=device)[:, None, None]
    x = (x - mean) / std
    erase, top, left, h, w = random_erasing_boxes(batch, height, width, device, re_prob)
    r = torch.arange(height, device=device)[None, :, None]
    c = torch.arange(width, device=device)[None, None, :]
    box = ((r >= top[:, None, None]) & (r < (top + h)[:, None, None]) & (c >= left[:, None, None])
           & (c < (left + w)[:, None, None]) & erase[:, None, None])                      # [B, H, W]
    return torch.where(box[:, None], mean, x).contiguous()


def decode_images(files, device):
    """JPEG bytes -> uint8 [3, h, w] images on device (nvjpeg on CUDA); None where a file does not decode."""
    decode_device = device if device.type == 'cuda' else 'cpu'
    if device.type == 'cuda':
        # nvJPEG's hardware engine writes its outputs before the work already queued on the stream has run, and
        # the caching allocator may hand it blocks that queued kernels still read (pytorch/vision#9606): the
        # decode then corrupts unrelated tensors (losses became NaN, a step counter garbage). Drain the stream
        # first; the decode synchronises it before returning anyway, so this moves the wait rather than adds one.
        torch.cuda.current_stream(device).synchronize()
    try:
        images = torchvision.io.decode_jpeg(files, device=decode_device)  # as stored: RGB, or grey [1, h, w]
    except RuntimeError:  # one bad file fails the batch: find it
        images = []
        for data in files:
            try:
                images.append(torchvision.io.decode_jpeg(data, device=decode_device))
            except RuntimeError:
                images.append(None)
    return [img if img is None else img.to(device).expand(3, -1, -1) for img in images]


def device_test_batches(items, size, batch_size, num_workers, device, pixel_mean=IMAGENET_MEAN,
                        pixel_std=IMAGENET_STD):
    """build_test_loader's batches with decoding, resizing and normalisation on `device` (nvjpeg on CUDA; the
    same code on the CPU): yields (images float32 [B, 3, H, W] on device, pids, camids) in the items' order.
    Loader workers only read file bytes; a file nvjpeg cannot decode (PNG ...) is decoded on the host."""
    device, (height, width) = torch.device(device), size
    num_workers = _usable_workers(num_workers)
    loader = DataLoader(EncodedImages(items), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_encoded)
    mean = torch.tensor(pixel_mean, device=device)[:, None, None]
    std = torch.tensor(pixel_std, device=device)[:, None, None]
    for data, lengths, pids, camids, indices in loader:
        files = list(data.split(lengths.tolist()))
        images = decode_images(files, device)
        for i, img in enumerate(images):
            if img is None:  # not a JPEG, or a broken one: the host decoder reads every format or names the file
                try:
                    images[i] = torchvision.io.decode_image(files[i], mode=torchvision.io.ImageReadMode.RGB).to(device)
                except RuntimeError as err:
                    raise DataError(f"{items[int(indices[i])][0]}: cannot decode the image ({err})") from None
        shapes = {img.shape for img in images}
        stacked = [torch.stack(images)] if len(shapes) == 1 else [img[None] for img in images]  # Market: one size
        resized = torch.cat([F.interpolate(x.float(), size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False) for x in stacked])
        yield (resized / 255 - mean) / std, pids, camids


class DeviceAugmentLoader:
    """The PK training loader with JPEG decoding and augmentation on `device`, for when CPU workers are the
    limit. Yields (images [B, 3, H, W] float32 on device, pids, camids), with with_is_real=True also is_real [B],
    like build_train_loader's loader (same arguments); `batch_sampler` is the PKSampler."""

    def __init__(self, items, num_ids, num_instances, size, num_workers, device, seed=0, rank=0, world_size=1,
                 flip_prob=0.5, padding=10, re_prob=0.5, sampler='random_identity', use_resampling=True,
                 drop_last=True, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, with_is_real=False):
        self.items, self.size, self.device, self.with_is_real = items, tuple(size), torch.device(device), with_is_real
        self.augment = {'flip_prob': flip_prob, 'padding': padding, 're_prob': re_prob,
                        'pixel_mean': tuple(pixel_mean), 'pixel_std': tuple(pixel_std)}
        self.batch_sampler = _train_sampler(items, num_ids, num_instances, seed, rank, world_size, sampler,
                                            use_resampling, drop_last, with_is_real)
        num_workers = _usable_workers(num_workers)
        self.loader = DataLoader(EncodedImages(items), batch_sampler=self.batch_sampler, num_workers=num_workers,
                                 collate_fn=collate_encoded, persistent_workers=num_workers > 0)

    def __len__(self):
        return len(self.batch_sampler)

    def _images(self, data, lengths, indices):
        """Decoded, augmented images [B, 3, H, W] on the device; mocks (no bytes) all zero."""
        is_real = indices < len(self.items)
        files = [f for f, real in zip(data.split(lengths.tolist()), is_real.tolist()) if real]
        images = decode_images(files, self.device)
        bad = [self.items[i][0] for i, img in zip(indices[is_real].tolist(), images) if img is None]
        if bad:
            raise DataError(f'{bad[0]}: not a readable JPEG file (--INPUT.DEVICE_AUGMENT decodes JPEG only; '
                            f'check the set with `python data.py check`)')
        augmented = augment_batch(images, self.size, **self.augment)
        if bool(is_real.all()):
            return augmented
        positions = torch.nonzero(is_real).flatten().to(self.device)  # from the host: no device sync
        return augmented.new_zeros(len(indices), *augmented.shape[1:]).index_copy_(0, positions, augmented)

    def __iter__(self):
        for data, lengths, pids, camids, indices in self.loader:
            images = self._images(data, lengths, indices)
            if self.with_is_real:
                yield images, pids, camids, indices < len(self.items)
            else:
                yield images, pids, camids


# ----------------------------------------------------------------------------------------------
# Synthetic data set: drawn people seen through cameras that differ in colour cast, background,
# blur and viewpoint, with pose jitter and occlusion, written in the Market-1501 layout.

CLOTHES = np.array([[0.85, 0.12, 0.12], [0.12, 0.35, 0.80], [0.15, 0.60, 0.20], [0.92, 0.85, 0.20],
                    [0.92, 0.92, 0.90], [0.10, 0.10, 0.12], [0.55, 0.55, 0.58], [0.90, 0.50, 0.10],
                    [0.50, 0.20, 0.60], [0.45, 0.30, 0.15], [0.10, 0.65, 0.70], [0.95, 0.60, 0.70]])
SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.68, 0.47, 0.33], [0.40, 0.27, 0.18]])
HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.08], [0.75, 0.60, 0.30], [0.55, 0.55, 0.55]])
VIEWS = ('front', 'back', 'side')
BACKGROUND_JITTER = 0.15
BODY_WIDTH = 1.5
BG_CONTRAST = (0.3, 1.0)


def _colour(rng, palette=CLOTHES):
    """A palette colour with a little jitter: identities share colours, as real clothes do."""
    return np.clip(palette[rng.integers(len(palette))] + rng.normal(0, 0.05, 3), 0, 1)


def draw_identity(rng):
    """The appearance of one synthetic person."""
    return dict(skin=_colour(rng, SKIN), hair=_colour(rng, HAIR), long_hair=rng.random() < 0.3,
                top=_colour(rng), top2=_colour(rng), pattern=int(rng.integers(4)),
                long_sleeves=rng.random() < 0.5, bottom=_colour(rng), shorts=rng.random() < 0.25,
                shoes=_colour(rng), bag=rng.random() < 0.4, bag_colour=_colour(rng),
                height=rng.uniform(0.78, 0.92), width=rng.uniform(0.85, 1.15))


def draw_camera(rng):
    """A camera: colour cast, gamma, background texture, blur, squeeze/shear and preferred views."""
    return dict(gain=rng.uniform(0.8, 1.2, 3), gamma=rng.uniform(0.85, 1.2), bg1=rng.uniform(0.15, 0.85, 3),
                bg2=rng.uniform(0.15, 0.85, 3), floor=rng.uniform(0.2, 0.7, 3), texture=int(rng.integers(3)),
                freq=rng.uniform(2, 7), floor_y=rng.uniform(0.72, 0.9), blur=rng.uniform(0.0, 1.3),
                squeeze=rng.uniform(0.8, 1.0), shear=rng.uniform(-0.12, 0.12),
                views=rng.dirichlet(np.full(3, 0.6)))


def _background(rng, camera, yy, xx):
    """The camera's scene, seen from a slightly different place each time: a textured wall, a
    floor and a clutter patch, in the camera's colours with per-image variation. [h, w, 3]"""
    phase, freq = rng.uniform(0, 2 * np.pi), camera['freq'] * rng.uniform(0.7, 1.4)
    if camera['texture'] == 0:
        wave = np.sin(2 * np.pi * freq * yy + phase)
    elif camera['texture'] == 1:
        wave = np.sin(4 * np.pi * freq * xx + phase)
    else:
        wave = np.sign(np.sin(2 * np.pi * freq * yy + phase) * np.sin(4 * np.pi * freq * xx))
    mix = (wave[..., None] * rng.uniform(*BG_CONTRAST) + 1) / 2
    bg1, bg2 = (np.clip(camera[k] + rng.normal(0, BACKGROUND_JITTER, 3), 0, 1) for k in ('bg1', 'bg2'))
    image = mix * bg1 + (1 - mix) * bg2
    cx, cy = rng.uniform(-0.3, 0.3), rng.uniform(0, 0.7)
    clutter = (np.abs(xx - cx) < rng.uniform(0.05, 0.2)) & (np.abs(yy - cy) < rng.uniform(0.05, 0.3))
    image = np.where(clutter[..., None], rng.uniform(0, 1, 3), image)
    floor = yy[..., None] > camera['floor_y'] + rng.normal(0, 0.03)
    return np.where(floor, camera['floor'] * (0.8 + 0.4 * yy[..., None]), image)


def _person_masks(person, view, t, s, swing, spread):
    """(mask, colour) layers of a person, back to front; t: 0 (top of head) .. 1 (feet), s: across."""
    width = 0.65 if view == 'side' else 1.0
    s = s / width
    torso = (t > 0.15) & (t < 0.52) & (np.abs(s) < 0.10)
    top = np.where(((person['pattern'] == 1) & (((t - 0.15) // 0.05) % 2 == 1))[..., None]
                   | ((person['pattern'] == 2) & (s > 0))[..., None]
                   | ((person['pattern'] == 3) & (view == 'front') & (t > 0.22) & (t < 0.32)
                      & (np.abs(s) < 0.045))[..., None], person['top2'], person['top'])
    arm_s = np.abs(np.abs(s) - 0.125 - swing * (t - 0.15)) if view != 'side' else np.abs(s - swing * (t - 0.15))
    arms = (t > 0.16) & (t < 0.5) & (arm_s < 0.028)
    leg_s = np.minimum(np.abs(s - 0.045 - spread * (t - 0.52)), np.abs(s + 0.045 + spread * (t - 0.52)))
    legs = (t > 0.5) & (t < 0.95) & (leg_s < 0.04)
    head = ((t - 0.075) / 0.07) ** 2 + (s / 0.055) ** 2 < 1
    hair_long = (person['long_hair'] & (t > 0.01) & (t < 0.24) & (np.abs(s) < 0.065)
                 & ((view != 'front') | (np.abs(s) > 0.04)))  # seen from the front: only beside the face
    hair = (head & ((t < 0.045) | (view == 'back'))) | hair_long
    layers = [
        (legs, np.where(((t > 0.7) & person['shorts'])[..., None], person['skin'], person['bottom'])),
        ((t >= 0.95) & (t < 1.0) & (leg_s < 0.05), person['shoes']),
        (torso, top),
        (arms, np.where(((t < 0.27) | ((t < 0.46) & person['long_sleeves']))[..., None], person['top'],
                        person['skin'])),
        ((t > 0.13) & (t < 0.16) & (np.abs(s) < 0.022), person['skin']),
        (head, person['skin']),
        (hair, person['hair']),
    ]
    if person['bag']:
        bag = {'back': (t > 0.18) & (t < 0.45) & (np.abs(s) < 0.085),
               'side': (t > 0.18) & (t < 0.45) & (s > -0.17) & (s < -0.09),
               'front': (t > 0.15) & (t < 0.36) & (np.abs(np.abs(s) - 0.06) < 0.013)}[view]
        layers.append((bag, person['bag_colour']))
    return layers


def render_image(rng, person, camera, size, fragment=False):
    """One image of `person` through `camera` (None: background only): uint8 [h, w, 3]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy + 0.5) / h, (xx + 0.5 - w / 2) / h  # both in units of the image height
    image = _background(rng, camera, yy, xx)
    if person is not None:
        height = person['height'] * rng.uniform(0.93, 1.05) * (rng.uniform(1.3, 2.2) if fragment else 1)
        top = (1 - height) / 2 + rng.normal(0, 0.02) + (rng.uniform(-0.5, 0.3) if fragment else 0)
        t = (yy - top) / height
        flip = 1 if rng.random() < 0.5 else -1
        s = flip * (xx - rng.normal(0, 0.03)) / (height * person['width'] * camera['squeeze'] * BODY_WIDTH)
        s = s + camera['shear'] * (t - 0.5)
        view = VIEWS[rng.choice(3, p=camera['views'])]
        shade = 1 - 0.35 * np.clip(np.abs(s) / 0.13, 0, 1)[..., None] ** 2
        for mask, colour in _person_masks(person, view, t, s, rng.normal(0, 0.15), rng.uniform(0, 0.15)):
            image = np.where(mask[..., None], colour * shade, image)
    if rng.random() < 0.3:  # an occluder entering from the bottom or a side
        occluder = (yy > rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else \
            (np.abs(xx - rng.choice([-0.25, 0.25])) < rng.uniform(0.05, 0.15) * w / h * 2)
        stripes = (np.sin(yy * rng.uniform(10, 40)) > 0)[..., None]
        image = np.where(occluder[..., None], np.where(stripes, _colour(rng), _colour(rng)), image)
    image = np.clip(image * rng.uniform(0.85, 1.15), 0, 1) ** camera['gamma'] * camera['gain']
    image = image + rng.normal(0, 0.02, image.shape)
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return pil.filter(ImageFilter.GaussianBlur(camera['blur'] * h / 128)) if camera['blur'] > 0.2 else pil


def _identity_images(rng, images_per_id, num_cameras):
    """Cameras of one identity's images: >= 2 cameras, each seen at least once. [n]"""
    n = int(rng.integers(max(2, images_per_id // 2), images_per_id * 3 // 2 + 1))
    cams = rng.choice(num_cameras, size=int(rng.integers(2, num_cameras + 1)), replace=False)
    return np.concatenate([cams, rng.choice(cams, size=max(0, n - len(cams)))])


def _split_query(rng, cams):
    """Query image positions of a test identity: one from each camera with >= 2 images (>= 1 query)."""
    queries = [int(rng.choice(np.flatnonzero(cams == c))) for c in np.unique(cams) if (cams == c).sum() >= 2]
    return queries or [0]


def synthesize(out, ids=120, images_per_id=16, cameras=6, size=(128, 64), seed=0, junk=0.05,
               distractors=0.1, quality=90, progress=True):
    """Write a synthetic data set in the Market-1501 layout; returns the image count per folder.

    Half of `ids` identities (pids 1..) train, the other half are query/gallery. Junk (pid -1,
    `junk` x images in train and gallery) are fragments of unseen people; distractors (pid 0,
    `distractors` x gallery images) are empty scenes or fragments."""
    from tqdm import tqdm
    if ids < 4 or images_per_id < 2 or cameras < 2:
        raise DataError(f'synthesize needs --ids >= 4, --images-per-id >= 2, --cameras >= 2 '
                        f'(got {ids}, {images_per_id}, {cameras})')
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f'{out} already holds files ({_listing(out)}): give a new folder or delete it')
    cams = [draw_camera(np.random.default_rng([seed, 1, c])) for c in range(cameras)]
    plan = []  # (folder, pid, camera, person, fragment)
    num_train = ids // 2
    for pid in range(1, ids + 1):
        rng = np.random.default_rng([seed, 2, pid])
        person, image_cams = draw_identity(rng), _identity_images(rng, images_per_id, cameras)
        queries = set() if pid <= num_train else set(_split_query(rng, image_cams))
        for i, c in enumerate(image_cams):
            folder = 'bounding_box_train' if pid <= num_train else 'query' if i in queries else 'bounding_box_test'
            plan.append((folder, pid, int(c), person, False))
    rng = np.random.default_rng([seed, 3])
    counts = {sub: sum(p[0] == sub for p in plan) for _, sub in MARKET_SPLITS}
    for folder in ('bounding_box_train', 'bounding_box_test'):
        plan += [(folder, -1, int(rng.integers(cameras)), draw_identity(rng), True)
                 for _ in range(round(junk * counts[folder]))]
    plan += [('bounding_box_test', 0, int(rng.integers(cameras)),  # empty scenes or fragments
              draw_identity(rng) if rng.random() < 0.5 else None, True)
             for _ in range(round(distractors * counts['bounding_box_test']))]
    for _, sub in MARKET_SPLITS:
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for frame, (folder, pid, c, person, fragment) in enumerate(tqdm(plan, 'synthesize', disable=not progress)):
        image = render_image(np.random.default_rng([seed, 4, frame]), person, cams[c], size, fragment)
        name = f'{pid:04d}_c{c + 1}s1_{frame:06d}_00.jpg' if pid >= 0 else f'-1_c{c + 1}s1_{frame:06d}_00.jpg'
        image.save(os.path.join(out, folder, name), quality=quality)
    return {sub: sum(p[0] == sub for p in plan) for _, sub in MARKET_SPLITS}


# ----------------------------------------------------------------------------------------------
# Check, throughput and the command line


def check(root, name):
    """Print each split's counts, decode every image and list the bad ones; returns their number."""
    from tqdm import tqdm
    ds = read_dataset(name, root)
    print(describe_dataset(ds))
    paths = sorted({path for split in ('train', 'query', 'gallery') for path, _, _ in ds[split]})
    bad = []
    for path in tqdm(paths, 'decode', unit='img'):
        try:
            load_image(path)
        except DataError as e:
            bad.append(str(e))
    for message in bad:
        print(message)
    print(f'{len(paths)} images decoded, {len(bad)} bad')
    return len(bad)


# ----------------------------------------------------------------------------------------------
# Before training: check every image once (cached); during training: survive a file that goes bad

CHECK_VERSION = 1  # bump when check_image gets stricter: verdicts cached by an older check no longer count
CACHE_DIR_ENV = "CENTROID_REID_CACHE_DIR"  # where the check's cache goes (default ~/.cache/centroid-reid)
REPORT_LIMIT = 20  # bad files listed by name


def check_image(path, jpeg_only=False):
    """'' if the file decodes as training will decode it, else why not. JPEGs decode at 1/8 scale (libjpeg
    still reads every byte, so a truncated or garbled file fails as in training, for a fraction of the work)."""
    try:
        with Image.open(path) as image:
            if jpeg_only and image.format != "JPEG":
                return f"a {image.format} file: INPUT.DEVICE_AUGMENT decodes JPEG only"
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            image.load()
    except Exception as err:  # noqa: BLE001  (any failure here would stop training: report it, whatever it is)
        return str(err) or type(err).__name__
    return ""


class _CheckedPaths(Dataset):
    """paths -> (path, check_image's verdict), for checking on the loader workers."""

    def __init__(self, paths, jpeg_only):
        self.paths, self.jpeg_only = paths, jpeg_only

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index], check_image(self.paths[index], self.jpeg_only)


def find_bad_images(paths, num_workers=0, jpeg_only=False, progress=True):
    """[(path, why)] of the files that do not decode, checked in parallel on `num_workers` loader processes."""
    from tqdm import tqdm
    loader = DataLoader(_CheckedPaths(list(paths), jpeg_only), batch_size=64, collate_fn=list,
                        num_workers=_usable_workers(num_workers),
                        generator=torch.Generator())  # not the global one: a check leaves training's draws alone
    bad = []
    with tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            bad += [(path, why) for path, why in batch if why]
            bar.update(len(batch))
    return bad


def check_cache_path():
    """The file that remembers data sets whose images all decoded: $CENTROID_REID_CACHE_DIR, else the user's
    cache folder (never the data folder, which may be read-only or shared)."""
    folder = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "centroid-reid")
    return os.path.join(folder, "checked_images.json")


def _fingerprint(paths, jpeg_only):
    """(key, entry) of a set of image files: the key names their folders, the entry changes when any file is
    added, removed, resized or touched. None when a file cannot be stat'ed (the check will say which)."""
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    digest = hashlib.sha1()
    try:
        for path in sorted(paths):
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    key = hashlib.sha1("\n".join(folders).encode()).hexdigest()[:20]
    return key, {"folders": folders[:8], "count": len(paths), "stamp": digest.hexdigest(),
                 "version": CHECK_VERSION, "jpeg_only": jpeg_only}


def _read_check_cache():
    try:
        with open(check_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def checked_before(paths, jpeg_only=False):
    """Whether these exact files (count, sizes, mtimes) all decoded in an earlier check."""
    fingerprint = _fingerprint(paths, jpeg_only)
    if fingerprint is None:
        return False
    key, entry = fingerprint
    seen = _read_check_cache().get(key)
    return bool(seen) and all(seen.get(k) == entry[k] for k in ("count", "stamp", "version")) and \
        (seen.get("jpeg_only") or not jpeg_only)


def remember_checked(paths, jpeg_only=False, keep=64):
    """Record that these files all decoded (best effort: an unwritable cache only means checking again)."""
    fingerprint = _fingerprint(paths, jpeg_only)
    if fingerprint is None:
        return
    key, entry = fingerprint
    cache = _read_check_cache()
    cache.pop(key, None)
    cache[key] = entry
    cache = dict(list(cache.items())[-keep:])  # the most recently checked sets
    path = check_cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        pass


def dataset_paths(dataset):
    """Every image file of a data set's train, query and gallery splits, once each, sorted."""
    return sorted({path for split in ("train", "query", "gallery") for path, _, _ in dataset[split]})


def preflight_check(dataset, num_workers=0, jpeg_only=False, progress=True):
    """Check every image of a data set before training: [(path, why)] of the bad ones ([] when all decode now or
    did in an earlier check of the same files). Prints one line on how it went."""
    paths = dataset_paths(dataset)
    if checked_before(paths, jpeg_only):
        print(f"images: all {len(paths)} decoded in an earlier check (unchanged since; {check_cache_path()})")
        return []
    start = time.perf_counter()
    bad = find_bad_images(paths, num_workers, jpeg_only, progress)
    seconds = time.perf_counter() - start
    print(f"images: {len(paths)} checked in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} images/s), "
          f"{len(bad)} bad", flush=True)
    if not bad:
        remember_checked(paths, jpeg_only)
    return bad


def bad_images_report(bad, total, names, root):
    """The lines that list bad files: the first REPORT_LIMIT with the reason, their count, the check command."""
    names = [names] if isinstance(names, str) else list(names)
    lines = [f"{len(bad)} of {total} images cannot be read:"]
    lines += [f"  {path}: {why}" for path, why in bad[:REPORT_LIMIT]]
    if len(bad) > REPORT_LIMIT:
        lines.append(f"  ... and {len(bad) - REPORT_LIMIT} more")
    lines.append("list them all with: " + "; ".join(f"python data.py check {root} --dataset {name}" for name in names))
    return "\n".join(lines)


def without_paths(dataset, paths):
    """The data set with the items of `paths` left out of every split (train pids keep their labels)."""
    paths = set(paths)
    return {**dataset, **{split: [item for item in dataset[split] if item[0] not in paths]
                          for split in ("train", "query", "gallery")}}


class GuardedImages(Dataset):
    """A training dataset of (path, pid, camid) items that survives a file going bad mid-run: an unreadable image
    is replaced by the next readable image of its identity. Each bad file is appended to `log_path` (path, tab,
    why) and the first message kept in `flag` (a shared multiprocessing char array) for the training process."""

    def __init__(self, dataset, log_path="", flag=None):
        self.dataset, self.log_path, self.flag = dataset, log_path, flag
        self.items = dataset.items
        self._by_pid, self._logged = None, set()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DataError as err:
            self._note(index, str(err))
        return self._replacement(index)

    def _replacement(self, index):
        """The next readable image of the identity (in item order, wrapping round): no random draw, so a
        replacement leaves the augmentation's random stream as it was."""
        if self._by_pid is None:
            self._by_pid = {}
            for i, (_, pid, _) in enumerate(self.items):
                self._by_pid.setdefault(pid, []).append(i)
        path, pid, _ = self.items[index]
        same = self._by_pid[pid]
        start = same.index(index)
        for other in same[start + 1:] + same[:start]:
            try:
                return self.dataset[other]
            except DataError as err:
                self._note(other, str(err))
        raise DataError(f"{path}: cannot read it, nor any other of the {len(same)} images of its identity "
                        f"(pid {pid}): python data.py check lists every bad file")

    def _note(self, index, message):
        """Log a bad file once per process and keep the first message in the shared flag."""
        path = self.items[index][0]
        if self.flag is not None:
            with self.flag.get_lock():
                if not self.flag.value:
                    self.flag.value = message.encode()[: len(self.flag) - 1]
        if path in self._logged or not self.log_path:
            return
        self._logged.add(path)
        why = check_image(path) or message  # the decoder's reason, as the check before training gives it
        print(f"warning: skipped {path}: {why}", file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(f"{path}\t{why}\n")


def with_dataset(loader, dataset, **changes):
    """A DataLoader like `loader` (its batches, workers, pinning, seeds) over another dataset; `changes` replace
    DataLoader arguments."""
    settings = {"batch_sampler": loader.batch_sampler, "num_workers": loader.num_workers,
                "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
                "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
                "generator": loader.generator, "prefetch_factor": loader.prefetch_factor,
                "persistent_workers": loader.persistent_workers}
    return DataLoader(dataset, **{**settings, **changes})


def throughput(root, name, workers=(0, 2), size=(256, 128), num_ids=16, num_instances=4, batches=10):
    """Decoded + augmented training images per second for each worker count: {workers: images/s}."""
    train = read_dataset(name, root)['train']
    results, threads = {}, torch.get_num_threads()
    for num_workers in workers:
        loader, _ = build_train_loader(train, num_ids, num_instances, size, num_workers)
        warmup = 1 + 2 * num_workers  # start-up and the prefetched batches are not throughput
        if len(loader) < warmup + batches:
            raise DataError(f'{root}: an epoch has {len(loader)} batches of {describe_batch(num_ids, num_instances)}, '
                            f'the measurement needs {warmup + batches}: use fewer --batches or a larger data set')
        torch.set_num_threads(1)  # as in a loader worker: the main process then measures one worker
        iterator = iter(loader)
        for _ in range(warmup):
            next(iterator)
        start, images = time.perf_counter(), 0
        for _, (x, _, _) in zip(range(batches), iterator):
            images += len(x)
        results[num_workers] = images / (time.perf_counter() - start)
        torch.set_num_threads(threads)
        print(f'workers={num_workers}: {results[num_workers]:.0f} images/s '
              f'({results[num_workers] / max(num_workers, 1):.0f} images/s per worker), '
              f'{size[0]}x{size[1]}, {describe_batch(num_ids, num_instances)}')
        del iterator, loader
    return results


def print_sampler_statistics(pids, num_ids, num_instances, samplers=SAMPLERS, epochs=3, seed=0, world_size=1,
                             drop_last=True):
    """Print sampler_statistics per sampler and epoch."""
    num_images, num_identities = len(pids), len(set(pids))
    print(f'{num_identities} identities, {num_images} images; {describe_batch(num_ids, num_instances, world_size)}')
    for sampler in samplers:
        for epoch in range(epochs):
            stats = sampler_statistics(pids, num_ids, num_instances, sampler, epoch, seed, world_size, drop_last)
            print(f'{sampler:<16} epoch {epoch}: {stats["steps"]} steps, {stats["images"]} images used '
                  f'({100 * stats["images"] / num_images:.1f}%), {stats["identities"]} identities used '
                  f'({100 * stats["identities"] / num_identities:.1f}%), '
                  f'{stats["co_batched"]:.1f} distinct co-batched identities per identity')


def main(argv=None):
    """The data CLI: synthesize, check, throughput, sampler-stats."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    p = commands.add_parser('synthesize', help='write the synthetic data set (Market-1501 layout)')
    p.add_argument('out')
    p.add_argument('--ids', type=int, default=120, help='identities, half train, half query/gallery')
    p.add_argument('--images-per-id', type=int, default=16, help='mean images per identity')
    p.add_argument('--cameras', type=int, default=6)
    p.add_argument('--size', type=int, nargs=2, default=[128, 64], metavar=('H', 'W'))
    p.add_argument('--seed', type=int, default=0)
    p = commands.add_parser('check', help='counts per split; decode every image and list bad ones')
    p.add_argument('root')
    p.add_argument('--dataset', required=True, help=f'one of {", ".join(DATASETS)}')
    p = commands.add_parser('throughput', help='decoded + augmented training images/s per worker')
    p.add_argument('root')
    p.add_argument('--dataset', default='synthetic')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    p.add_argument('--size', type=int, nargs=2, default=[256, 128], metavar=('H', 'W'))
    p.add_argument('--batches', type=int, default=10)
    p = commands.add_parser('sampler-stats', help='per epoch: steps, images and identities used, co-batching')
    p.add_argument('root', nargs='?', help='data root (or --simulate)')
    p.add_argument('--dataset', default='synthetic')
    p.add_argument('--simulate', choices=sorted(SIMULATED), help='a label list of that size instead of ROOT')
    p.add_argument('--sampler', choices=SAMPLERS, help='one sampler (default: both)')
    p.add_argument('--ids', type=int, default=16, help='identities per batch P (SOLVER.IMS_PER_BATCH)')
    p.add_argument('--instances', type=int, default=4, help='images per identity K (DATALOADER.NUM_INSTANCE)')
    p.add_argument('--world-size', type=int, default=1, help='devices (ranks) sharing each step')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--keep-last', action='store_true', help='drop_last=False: a last, smaller step')
    args = parser.parse_args(argv)
    if args.command == 'sampler-stats' and (args.root is None) == (args.simulate is None):
        parser.error('sampler-stats: give ROOT or --simulate NAME (one of them)')
    try:
        if args.command == 'synthesize':
            start = time.perf_counter()
            counts = synthesize(args.out, args.ids, args.images_per_id, args.cameras, tuple(args.size), args.seed)
            print(f'{args.out}: ' + ', '.join(f'{sub}/ {n} images' for sub, n in counts.items())
                  + f' ({time.perf_counter() - start:.1f} s)')
        elif args.command == 'check':
            return 1 if check(args.root, args.dataset) else 0
        elif args.command == 'sampler-stats':
            pids = (simulated_pids(args.simulate) if args.simulate
                    else [pid for _, pid, _ in read_dataset(args.dataset, args.root)['train']])
            print_sampler_statistics(pids, args.ids, args.instances, [args.sampler] if args.sampler else SAMPLERS,
                                     args.epochs, args.seed, args.world_size, not args.keep_last)
        else:
            throughput(args.root, args.dataset, args.workers, tuple(args.size), batches=args.batches)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
