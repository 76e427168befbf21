"""The data side's settings as small frozen values, built once from the configuration: how PK batches are drawn
(BatchSpec), how training images are augmented (AugmentSpec), the training loader (LoaderSpec: both, plus the loader
processes and where images are decoded) and how test images are embedded (EmbedSpec).

    spec = loader_spec(cfg)              # train.py: data.build_train_loader(items, spec, rank, world_size, ...)
    spec = embed_spec(cfg, amp_dtype)    # evaluate.py: data.build_test_loader(items, spec) -> extract_features
"""
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BatchSpec:
    """PK batches (sampler.PKSampler): num_ids identities (P, SOLVER.IMS_PER_BATCH) x num_instances images (K,
    DATALOADER.NUM_INSTANCE) per device and step. sampler (DATALOADER.SAMPLER): 'random_identity' or 'balanced';
    use_resampling (DATALOADER.USE_RESAMPLING): fill a short last chunk with its own images (True) or mocks;
    drop_last (DATALOADER.DROP_LAST): no last, smaller step; seed (SOLVER.SEED): an epoch is a function of
    (seed, epoch)."""
    num_ids: int
    num_instances: int = 4
    sampler: str = "random_identity"
    use_resampling: bool = True
    drop_last: bool = True
    seed: int = 0


@dataclass(frozen=True)
class AugmentSpec:
    """The training augmentation (transforms.build_train_transform per image, device_data.augment_batch per batch):
    resize to size (H, W), flip with flip_prob, zero padding + random crop, normalisation by pixel_mean / pixel_std,
    the original's random erasing with erasing_prob, filled with pixel_mean."""
    size: tuple = (256, 128)
    flip_prob: float = 0.5
    padding: int = 10
    erasing_prob: float = 0.5
    pixel_mean: tuple = IMAGENET_MEAN
    pixel_std: tuple = IMAGENET_STD


@dataclass(frozen=True)
class LoaderSpec:
    """The training loader (data.build_train_loader, device_data.DeviceAugmentLoader): its batches, its augmentation,
    num_workers loader processes, and device_augment (INPUT.DEVICE_AUGMENT): the device decodes and augments."""
    batch: BatchSpec
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    num_workers: int = 0
    device_augment: bool = False


@dataclass(frozen=True)
class EmbedSpec:
    """How test images are embedded (data.build_test_loader, device_data.device_test_batches, evaluate.py,
    retrieve.py): resized to size (H, W) and normalised by pixel_mean / pixel_std, batch_size images a batch from
    num_workers loader processes; flip averages each embedding with its mirror image's; amp_dtype: the autocast
    dtype, None for fp32."""
    size: tuple = (256, 128)
    batch_size: int = 128
    num_workers: int = 0
    flip: bool = False
    amp_dtype: object = None
    pixel_mean: tuple = IMAGENET_MEAN
    pixel_std: tuple = IMAGENET_STD


def loader_spec(cfg):
    """The training loader's spec from the configuration (SOLVER.IMS_PER_BATCH and SEED, DATALOADER, INPUT)."""
    loader, inputs = cfg.DATALOADER, cfg.INPUT
    batch = BatchSpec(cfg.SOLVER.IMS_PER_BATCH, loader.NUM_INSTANCE, loader.SAMPLER, loader.USE_RESAMPLING,
                      loader.DROP_LAST, cfg.SOLVER.SEED)
    augment = AugmentSpec(tuple(inputs.SIZE_TRAIN), inputs.PROB, inputs.PADDING, inputs.RE_PROB,
                          tuple(inputs.PIXEL_MEAN), tuple(inputs.PIXEL_STD))
    return LoaderSpec(batch, augment, loader.NUM_WORKERS, inputs.DEVICE_AUGMENT)


def embed_spec(cfg, amp_dtype=None, size=None):
    """The spec of embedding test images from the configuration: INPUT.SIZE_TEST (or size, e.g. a checkpoint's),
    TEST.IMS_PER_BATCH, DATALOADER.NUM_WORKERS, TEST.FLIP_FEATS, INPUT.PIXEL_MEAN / PIXEL_STD."""
    return EmbedSpec(tuple(size or cfg.INPUT.SIZE_TEST), cfg.TEST.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS,
                     cfg.TEST.FLIP_FEATS, amp_dtype, tuple(cfg.INPUT.PIXEL_MEAN), tuple(cfg.INPUT.PIXEL_STD))
