"""Image transforms: the training augmentation and the test resize + normalisation, per image (torchvision v2)."""
import torch
from torchvision.transforms import v2

from support.specs import IMAGENET_MEAN, IMAGENET_STD

ERASING_SCALE, ERASING_RATIO = (0.02, 0.4), (0.3, 1 / 0.3)  # the original RandomErasing's sl, sh and r1, 1/r1


def random_erasing_boxes(batch, height, width, device, prob=0.5, generator=None, tries=100):
    """Per image: whether to erase and the box (top, left, h, w), drawn as the original's RandomErasing (area
    0.02-0.4 of the image, aspect h/w 0.3-3.33): with probability prob, up to `tries` draws of an area and an
    aspect; the first box that fits (h < H, w < W) wins, none -> no erasing; top and left are uniform. Draws
    from generator (a torch.Generator on device), or the device's global stream when None."""
    (low, high), (ratio_low, ratio_high) = ERASING_SCALE, ERASING_RATIO
    area = height * width * torch.empty(batch, tries, device=device).uniform_(low, high, generator=generator)  # [B, T]
    aspect = torch.empty(batch, tries, device=device).uniform_(ratio_low, ratio_high, generator=generator)  # [B, T]
    h = torch.sqrt(area * aspect).round().long()  # round half to even, as Python's round()
    w = torch.sqrt(area / aspect).round().long()
    fits = (h < height) & (w < width)                                                           # [B, T]
    first = fits.long().argmax(dim=1, keepdim=True)                                             # [B, 1]
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]                                   # [B]
    erase = (torch.rand(batch, device=device, generator=generator) < prob) & fits.any(dim=1)
    top = (torch.rand(batch, device=device, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(batch, device=device, generator=generator) * (width - w + 1)).long()
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


def build_train_transform(augment):
    """The augmentation of one image (an AugmentSpec): resize, flip, pad + random crop, normalisation, the original's
    random erasing."""
    return v2.Compose([
        v2.ToImage(),  # uint8 tensor: the geometric ops below are cheaper on it than on PIL
        v2.Resize(list(augment.size), antialias=True),
        v2.RandomHorizontalFlip(augment.flip_prob),
        v2.Pad(augment.padding),
        v2.RandomCrop(list(augment.size)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(augment.pixel_mean), list(augment.pixel_std)),
        RandomErasing(augment.erasing_prob, augment.pixel_mean),
    ])


def build_test_transform(size=(256, 128), pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
    """Resize + normalisation by pixel_mean / pixel_std."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(list(size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(pixel_mean), list(pixel_std)),
    ])

