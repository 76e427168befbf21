"""Image checks: before training, decode every image once (parallel, cached per set of files); during a run, the
one policy for a file that cannot be read (UnreadableImages), which training, evaluation and retrieve share."""
import dataclasses
import hashlib
import json
import os
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from support.utils import DataError, split_item, usable_workers, write_text_atomic

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
                        num_workers=usable_workers(num_workers),
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
    """The check cache: {key: fingerprint entry}, {} when it is missing or unreadable."""
    try:
        with open(check_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def checked_before(fingerprint, jpeg_only=False):
    """Whether the files of a _fingerprint (count, sizes, mtimes) all decoded in an earlier check."""
    if fingerprint is None:
        return False
    key, entry = fingerprint
    seen = _read_check_cache().get(key)
    return bool(seen) and all(seen.get(k) == entry[k] for k in ("count", "stamp", "version")) and \
        (seen.get("jpeg_only") or not jpeg_only)


def remember_checked(fingerprint, keep=64):
    """Record that the files of a _fingerprint all decoded (best effort: an unwritable cache only means checking
    again)."""
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
        write_text_atomic(path, json.dumps(cache))
    except OSError:
        pass


def dataset_paths(dataset, splits=("train", "query", "gallery")):
    """Every image file of a data set's splits, once each, sorted."""
    return sorted({path for split in splits for path, _, _ in dataset[split]})


def preflight_check(dataset, num_workers=0, jpeg_only=False, progress=True):
    """Check every image of a data set before training: [(path, why)] of the bad ones ([] when all decode now or
    did in an earlier check of the same files). Prints one line on how it went."""
    paths = dataset_paths(dataset)
    fingerprint = _fingerprint(paths, jpeg_only)  # as the files were before the check: a later change re-checks
    if checked_before(fingerprint, jpeg_only):
        print(f"images: all {len(paths)} decoded in an earlier check (unchanged since; {check_cache_path()})")
        return []
    start = time.perf_counter()
    bad = find_bad_images(paths, num_workers, jpeg_only, progress)
    seconds = time.perf_counter() - start
    print(f"images: {len(paths)} checked in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):.0f} images/s), "
          f"{len(bad)} bad", flush=True)
    if not bad:
        remember_checked(fingerprint)
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


SKIPPED = "skipped.txt"  # where a policy that skips lists the images left out or replaced: "path<TAB>why" a line


@dataclasses.dataclass(frozen=True)
class UnreadableImages:
    """The one policy for an image file that cannot be read, shared by training, evaluation and retrieve: skip it
    (DATALOADER.SKIP_BAD, retrieve's --skip-bad) or stop with one message naming the file and the fix. A skipped
    file gets a warning and a line in log_dir/skipped.txt (once; no log without a log_dir). What stands in for a
    skipped image is the caller's: training reads another of its identity, evaluation and retrieve leave it out."""

    skip: bool = False
    fix: str = "set --DATALOADER.SKIP_BAD true"  # how the user asks for skipping, in the message that stops
    log_dir: str = ""

    @classmethod
    def from_config(cls, cfg):
        """The policy of a training or evaluation config: DATALOADER.SKIP_BAD, logged in OUTPUT_DIR."""
        return cls(skip=bool(cfg.DATALOADER.SKIP_BAD), log_dir=cfg.OUTPUT_DIR)

    def message(self, path, why):
        """The one line that names an unreadable file and the fix."""
        return f"cannot read image {path} ({why}): replace or delete it, or {self.fix} to leave out unreadable images"

    def read(self, path, load):
        """load()'s value (it reads the file at path); when it cannot (DataError): None if the policy skips (the
        file logged), else DataError with the policy's message."""
        try:
            return load()
        except DataError as err:
            why = check_image(path) or str(err)  # the decoder's reason, as the check before training gives it
        if not self.skip:
            raise DataError(self.message(path, why))
        self.log([(path, why)])
        return None

    def log(self, bad):
        """Warn about, and add to skipped.txt, the files of [(path, why)] it does not list yet."""
        if not self.log_dir:
            return
        listed = self.skipped()
        new = [(path, why) for path, why in dict(bad).items() if path not in listed]
        for path, why in new:
            print(f"warning: skipped {path}: {why}", file=sys.stderr, flush=True)
        if new:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, SKIPPED), "a") as f:
                f.writelines(f"{path}\t{why}\n" for path, why in new)

    def skipped(self):
        """{path: why} of skipped.txt (several loader processes may have listed a file: once each here)."""
        path = os.path.join(self.log_dir, SKIPPED)
        if not self.log_dir or not os.path.exists(path):
            return {}
        with open(path) as f:
            return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)

    def count_skipped(self):
        """The number of distinct files skipped so far; rewrites skipped.txt with each once."""
        skipped = self.skipped()
        if skipped:
            write_text_atomic(os.path.join(self.log_dir, SKIPPED), "".join(f"{p}\t{w}\n" for p, w in skipped.items()))
        return len(skipped)


class GuardedImages(Dataset):
    """A training dataset of (path, pid, camid) items read under an UnreadableImages policy: when it skips, an
    unreadable image is replaced by the next readable image of its identity, with the same augmentation seed (P x K
    stays whole); when it stops, the DataError carries the policy's message."""

    def __init__(self, dataset, policy):
        self.dataset, self.policy = dataset, policy
        self.items = dataset.items
        self._by_pid = None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = split_item(item)
        path = self.items[index % len(self.items)][0]  # index len(items) + i: a mock of item i (never read)
        got = self.policy.read(path, lambda: self.dataset[item])
        return self._replacement(index, seed) if got is None else got

    def _replacement(self, index, seed):
        """The next readable image of the identity (in item order, wrapping round), augmented with the seed of the
        image it replaces."""
        if self._by_pid is None:
            self._by_pid = {}
            for i, (_, pid, _) in enumerate(self.items):
                self._by_pid.setdefault(pid, []).append(i)
        path, pid, _ = self.items[index]
        same = self._by_pid[pid]
        start = same.index(index)
        for other in same[start + 1:] + same[:start]:
            got = self.policy.read(self.items[other][0], lambda o=other: self.dataset[o if seed is None else (o, seed)])
            if got is not None:
                return got
        raise DataError(f"{path}: cannot read it, nor any other of the {len(same)} images of its identity "
                        f"(pid {pid}): python data.py check lists every bad file")


def with_dataset(loader, dataset, **changes):
    """A DataLoader like `loader` (its batches, workers, pinning, seeds) over another dataset; `changes` replace
    DataLoader arguments."""
    settings = {"batch_sampler": loader.batch_sampler, "num_workers": loader.num_workers,
                "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
                "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
                "generator": loader.generator, "prefetch_factor": loader.prefetch_factor,
                "persistent_workers": loader.persistent_workers}
    return DataLoader(dataset, **{**settings, **changes})


