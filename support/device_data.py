"""Decoding and augmentation on the device (--INPUT.DEVICE_AUGMENT): loader workers only read file bytes; the
device (nvjpeg on CUDA, the same code on the CPU) decodes, resizes, augments and normalises whole batches."""
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset

from support.sampler import SeededBatches, train_sampler
from support.transforms import random_erasing_boxes
from support.utils import DataError, split_item, usable_workers


class EncodedImages(Dataset):
    """(path, pid, camid) items -> (file bytes as a uint8 tensor, pid, camid, index, augmentation seed or -1);
    index len(items) + i (a mock of item i, see PKSampler) gives no bytes."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        index, seed = split_item(item)  # an index, or (index, augmentation seed) from SeededBatches
        seed = -1 if seed is None else seed
        real = index < len(self.items)
        path, pid, camid = self.items[index if real else index - len(self.items)]
        if not real:
            return torch.empty(0, dtype=torch.uint8), pid, camid, index, seed
        try:
            return torchvision.io.read_file(path), pid, camid, index, seed
        except (OSError, RuntimeError) as err:
            raise DataError(f"{path}: cannot read the file ({err})") from None


def collate_encoded(batch):
    """(all files' bytes in one tensor, lengths [B], pids [B], camids [B], indices [B], seeds [B]): one shared
    buffer per batch (a tensor per image would pass a file descriptor per image between processes)."""
    data, pids, camids, indices, seeds = zip(*batch)
    return (torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(pids), torch.tensor(camids),
            torch.tensor(indices), torch.tensor(seeds))


def resize_batch(images, size):
    """uint8 [3, h, w] list -> float [B, 3, H, W] in 0..1, resized bilinear with antialiasing as the CPU
    transforms do; one kernel for the batch when all share one size (Market: all 128x64)."""
    resize = lambda x: F.interpolate(x.float(), size=tuple(size), mode="bilinear", antialias=True,  # noqa: E731
                                     align_corners=False)
    if all(img.shape == images[0].shape for img in images):
        return resize(torch.stack(images)) / 255
    return torch.cat([resize(img[None]) for img in images]) / 255


def augment_batch(images, augment, generator=None):
    """build_train_transform on a whole batch on its device (an AugmentSpec): uint8 [3, h, w] list -> float
    [B, 3, H, W].

    Resize (bilinear, antialiased), flip, zero pad + random crop, normalisation, the original's random erasing
    (filled with pixel_mean): the same draws and distributions as the per-image torchvision pipeline, drawn
    from generator (a torch.Generator on the images' device; the device's global stream when None)."""
    (height, width), padding = augment.size, augment.padding
    device = images[0].device
    x = resize_batch(images, augment.size)  # [B, 3, H, W]
    batch = len(x)
    flip = torch.rand(batch, device=device, generator=generator) < augment.flip_prob
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # pad + crop = shift by (padding - offset) with zeros coming in; offsets uniform in 0..2*padding
    dy, dx = torch.randint(0, 2 * padding + 1, (2, batch, 1), device=device, generator=generator)
    rows = torch.arange(height, device=device) + dy - padding                               # [B, H]
    cols = torch.arange(width, device=device) + dx - padding                                # [B, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    b = torch.arange(batch, device=device)[:, None, None]
    x = x[b, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]  # [B, H, W, 3]
    x = (x * inside[..., None]).permute(0, 3, 1, 2)
    mean = torch.tensor(augment.pixel_mean, device=device)[:, None, None]
    std = torch.tensor(augment.pixel_std, device=device)[:, None, None]
    x = (x - mean) / std
    erase, top, left, h, w = random_erasing_boxes(batch, height, width, device, augment.erasing_prob, generator)
    r = torch.arange(height, device=device)[None, :, None]
    c = torch.arange(width, device=device)[None, None, :]
    box = ((r >= top[:, None, None]) & (r < (top + h)[:, None, None]) & (c >= left[:, None, None])
           & (c < (left + w)[:, None, None]) & erase[:, None, None])                      # [B, H, W]
    return torch.where(box[:, None], mean, x).contiguous()


def decode_images(files, device):
    """JPEG bytes -> uint8 [3, h, w] images on device (nvjpeg on CUDA); None where a file does not decode."""
    decode_device = device if device.type == "cuda" else "cpu"
    if device.type == "cuda":
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


def device_test_batches(items, spec, device, unreadable=None):
    """build_test_loader's batches (an EmbedSpec) with decoding, resizing and normalisation on `device` (nvjpeg on
    CUDA; the same code on the CPU): yields (images float32 [B, 3, H, W] on device, pids, camids) in the items'
    order; with an UnreadableImages policy, data.MarkedImages' (images, positions, readable) instead. Loader workers
    only read file bytes; a file nvjpeg cannot decode (PNG ...) is decoded on the host."""
    device = torch.device(device)
    num_workers = usable_workers(spec.num_workers)
    loader = DataLoader(EncodedImages(items), batch_size=spec.batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_encoded)
    mean = torch.tensor(spec.pixel_mean, device=device)[:, None, None]
    std = torch.tensor(spec.pixel_std, device=device)[:, None, None]
    for data, lengths, pids, camids, indices, _ in loader:
        files = list(data.split(lengths.tolist()))
        images = decode_images(files, device)
        readable = torch.ones(len(files), dtype=torch.int64)
        for i, img in enumerate(images):
            if img is None:  # not a JPEG, or a broken one: the host decoder reads every format or names the file
                path = items[int(indices[i])][0]
                images[i] = _host_decoded(files[i], path, device) if unreadable is None else \
                    unreadable.read(path, lambda data=files[i], path=path: _host_decoded(data, path, device))
            if images[i] is None:  # skipped by the policy: a blank row, marked
                images[i], readable[i] = torch.zeros(3, *spec.size, dtype=torch.uint8, device=device), 0
        batch = (resize_batch(images, spec.size) - mean) / std
        yield (batch, pids, camids) if unreadable is None else (batch, indices, readable)


def _host_decoded(data, path, device):
    """A file's bytes decoded by the host decoder (every format) as uint8 [3, h, w] on device; DataError naming it."""
    try:
        return torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB).to(device)
    except RuntimeError as err:
        raise DataError(f"{path}: cannot decode the image ({err})") from None


class DeviceAugmentLoader:
    """The PK training loader of a LoaderSpec with JPEG decoding and augmentation on `device`, for when CPU workers
    are the limit. Yields (images [B, 3, H, W] float32 on device, pids, camids), with with_is_real=True also
    is_real [B], like build_train_loader's loader (its arguments, and the device); `batch_sampler` is the PKSampler."""

    def __init__(self, items, spec, device, rank=0, world_size=1, with_is_real=False):
        self.items, self.augment, self.with_is_real = items, spec.augment, with_is_real
        self.device = torch.device(device)
        self.batch_sampler = train_sampler(items, spec.batch, rank, world_size, with_is_real)
        num_workers = usable_workers(spec.num_workers)
        self.loader = DataLoader(EncodedImages(items), batch_sampler=SeededBatches(self.batch_sampler),
                                 num_workers=num_workers, collate_fn=collate_encoded,
                                 persistent_workers=num_workers > 0)

    def __len__(self):
        return len(self.batch_sampler)

    def _images(self, data, lengths, indices, seeds):
        """Decoded, augmented images [B, 3, H, W] on the device; mocks (no bytes) all zero. The batch's draws
        come from a generator seeded with its first image's seed: a function of (seed, rank, epoch, step)."""
        is_real = indices < len(self.items)
        files = [f for f, real in zip(data.split(lengths.tolist()), is_real.tolist()) if real]
        images = decode_images(files, self.device)
        bad = [self.items[i][0] for i, img in zip(indices[is_real].tolist(), images) if img is None]
        if bad:
            raise DataError(f"{bad[0]}: not a readable JPEG file (--INPUT.DEVICE_AUGMENT decodes JPEG only; "
                            f"check the set with `python data.py check`)")
        generator = torch.Generator(self.device).manual_seed(int(seeds[0]))
        augmented = augment_batch(images, self.augment, generator=generator)
        if bool(is_real.all()):
            return augmented
        positions = torch.nonzero(is_real).flatten().to(self.device)  # from the host: no device sync
        return augmented.new_zeros(len(indices), *augmented.shape[1:]).index_copy_(0, positions, augmented)

    def __iter__(self):
        for data, lengths, pids, camids, indices, seeds in self.loader:
            images = self._images(data, lengths, indices, seeds)
            if self.with_is_real:
                yield images, pids, camids, indices < len(self.items)
            else:
                yield images, pids, camids


