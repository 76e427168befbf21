"""ResNet backbones (torchvision layout, IBN-a) with the BNNeck, and weight loading.

CTLModel = backbone -> global average pooling -> feature f [B, D] -> BatchNorm1d (bias frozen at 0)
-> bias-free classifier. Training forward returns (f, logits); eval forward returns BN(f).

Weight files (torchvision and IBN-a ImageNet files, our own checkpoints, Lightning checkpoints of the original
centroids-reid) are read by checkpoint.read_weights, which owns their format.
"""
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

from support.checkpoint import WeightError, read_weights, recorded_architecture, stem_relu_of, trained_inputs

MODELS_DIR = Path(__file__).resolve().parent / "models"

TORCHVISION_URL = "https://download.pytorch.org/models/"
IBN_URL = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"

# name -> torchvision constructor, embedding size, ImageNet file name, where to download it by hand (+ name)
ARCHS = {
    "resnet18": (torchvision.models.resnet18, 512, "resnet18-5c106cde.pth", TORCHVISION_URL),
    "resnet34": (torchvision.models.resnet34, 512, "resnet34-333f7ec4.pth", TORCHVISION_URL),
    "resnet50": (torchvision.models.resnet50, 2048, "resnet50-19c8e357.pth", TORCHVISION_URL),
    "resnet101": (torchvision.models.resnet101, 2048, "resnet101-5d3b4d8f.pth", TORCHVISION_URL),
    "resnet152": (torchvision.models.resnet152, 2048, "resnet152-b121ed2d.pth", TORCHVISION_URL),
    "resnet50_ibn_a": (torchvision.models.resnet50, 2048, "resnet50_ibn_a-d9d0bb7b.pth", IBN_URL),
    "resnet101_ibn_a": (torchvision.models.resnet101, 2048, "resnet101_ibn_a-59ea0ac6.pth", IBN_URL),
}
BACKBONE_EMB_SIZES = {name: arch[1] for name, arch in ARCHS.items()}

# block counts of layer1..4 (and whether blocks are bottlenecks) -> architecture, to read files
_DEPTHS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
           ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
           ((3, 8, 36, 3), True): "resnet152"}

class IBN(nn.Module):
    """IBN-a norm: InstanceNorm on the first half of the channels, BatchNorm on the rest."""

    def __init__(self, planes):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        inst, batch = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        # per-image statistics in float32: fp16 variance over a small map loses too much
        inst = self.IN(inst.float()).to(x.dtype)
        return torch.cat([inst, self.BN(batch).to(x.dtype)], dim=1)


def original_stem_relu(name):
    """Whether the original centroids-reid builds `name` with a ReLU after the stem's bn1: its plain ResNets
    (inherited from reid-strong-baseline) have none, its IBN-a nets keep it."""
    return name.endswith("_ibn_a")


def stem_relu_message(model, pretrained):
    """A line to print once at start when the stem differs from the net the ImageNet weights were trained as."""
    if not pretrained or model.stem_relu:
        return ""
    return (f"{model.name}: no ReLU after the stem's bn1, as in the original centroids-reid; the ImageNet weights "
            f"were trained with that ReLU (build_model(stem_relu=True) keeps it)")


class Backbone(nn.Module):
    """torchvision ResNet without avgpool/fc; keys read conv1.*, bn1.*, layer1.* ... layer4.*."""

    def __init__(self, name="resnet50", last_stride=1, stem_relu=None):
        super().__init__()
        stem_relu = original_stem_relu(name) if stem_relu is None else stem_relu
        net = ARCHS[name][0](weights=None)
        if name.endswith("_ibn_a"):
            for layer in (net.layer1, net.layer2, net.layer3):
                for block in layer:
                    block.bn1 = IBN(block.bn1.num_features)
        first = net.layer4[0]
        # torchvision v1.5 layout: the stride sits on conv2 of a Bottleneck, conv1 of a BasicBlock
        strided = first.conv2 if isinstance(first, torchvision.models.resnet.Bottleneck) else first.conv1
        strided.stride = (last_stride, last_stride)
        first.downsample[0].stride = (last_stride, last_stride)
        self.conv1, self.bn1, self.maxpool = net.conv1, net.bn1, net.maxpool
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        """[B, 3, H, W] -> feature map [B, D, H/16 or H/32, W/16 or W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CTLModel(nn.Module):
    """Backbone, global average pooling, BNNeck (bias frozen at 0) and a bias-free classifier."""

    def __init__(self, name="resnet50", num_classes=751, last_stride=1, stem_relu=None):
        super().__init__()
        self.name, self.last_stride = name, last_stride
        self.feat_dim, self.num_classes = BACKBONE_EMB_SIZES[name], num_classes
        self.backbone = Backbone(name, last_stride, stem_relu)
        self.bn = nn.BatchNorm1d(self.feat_dim)
        self.bn.bias.requires_grad_(False)  # BNNeck: the bias stays 0
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.input_size = None  # [H, W] it was tested at, when read from a checkpoint

    @property
    def stem_relu(self):
        """Whether the stem has a ReLU after bn1 (False for the original centroids-reid nets)."""
        return isinstance(self.backbone.relu, nn.ReLU)

    def forward(self, x, is_real=None):
        """Training: (pre-BN feature [B, D], logits [B, C]); eval: embedding BN(f) [B, D].

        is_real [B] (bool, training only): the BNNeck's batch statistics come from the real images only, as the
        original applies its BNNeck to the real features alone; mock images still pass through the backbone.
        None (no mock images): the BNNeck's own forward."""
        feat = self.backbone(x).mean(dim=(2, 3))  # global average pooling, [B, D]
        if not self.training:
            return self.bn(feat)
        neck = self.bn(feat) if is_real is None else masked_batch_norm(self.bn, feat, is_real)
        return feat, self.classifier(neck)


def masked_batch_norm(bn, x, mask=None):
    """Training-mode BatchNorm of x [B, C, ...] with statistics over the rows where mask [B] is True (every row when
    None), and the running statistics updated with them; every row is normalised. No host sync: the mask is a
    weight, not an index. When bn is a SyncedBatchNorm in a process group of several ranks, the statistics are
    those of every rank's rows: the counts and sums are all-reduced, and so are their gradients."""
    dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    values = x.float()
    per_row = values.numel() // (values.shape[0] * values.shape[1])  # positions per row and channel (H x W)
    if mask is None:
        weight, count = None, values.new_full((1,), float(values.shape[0] * per_row))
        sums = values.sum(dims)
    else:
        weight = mask.to(torch.float32).view(-1, *[1] * (x.dim() - 1))  # [B, 1, ...]
        count, sums = weight.sum().reshape(1) * per_row, (weight * values).sum(dims)
    totals = _sum_over_ranks(torch.cat([count, sums]), bn)  # [1 + C]
    count, mean = totals[0], totals[1:] / totals[0]
    centred = values - mean.view(shape)
    squares = centred.pow(2) if weight is None else weight * centred.pow(2)
    var = _sum_over_ranks(squares.sum(dims), bn) / count
    out = centred * torch.rsqrt(var + bn.eps).view(shape) * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            bn.running_mean.lerp_(mean, momentum)
            bn.running_var.lerp_(var * count / (count - 1).clamp_min(1), momentum)  # unbiased, as BatchNorm
    return out.to(x.dtype)


def _sum_over_ranks(tensor, bn):
    """tensor summed over bn's process group when bn is a SyncedBatchNorm with several ranks (differentiable: the
    gradient is all-reduced too); tensor itself otherwise."""
    if not isinstance(bn, SyncedBatchNorm) or _group_size(bn.process_group) == 1:
        return tensor
    return _SumOverRanks.apply(tensor, bn.process_group or dist.group.WORLD)


class _SumOverRanks(torch.autograd.Function):
    """A sum over a process group's ranks whose gradient is the sum of every rank's gradient (each rank's loss
    depends on every rank's rows through it)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _group_size(process_group):
    """Ranks in a process group (the default one for None); 1 without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group or dist.group.WORLD)


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose training statistics are those of every rank's batch (SOLVER.SYNC_BN), on every
    device alike: torch's SyncBatchNorm runs on accelerators only, so the CPU could not test it. Eval mode, and a
    single process, are plain BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, process_group=None):
        super().__init__(num_features, eps, momentum)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions, got {input.dim()}")

    def forward(self, x):
        """x [B, C, ...] -> normalised x; statistics over the process group in training."""
        if not self.training or _group_size(self.process_group) == 1:
            return super().forward(x)
        return masked_batch_norm(self, x)


def has_sync_bn(module):
    """Whether any submodule synchronises BatchNorm statistics over ranks (SOLVER.SYNC_BN)."""
    return any(isinstance(m, (SyncedBatchNorm, nn.SyncBatchNorm)) for m in module.modules())


def synchronise_batch_norms(module, process_group=None):
    """module with each BatchNorm1d/2d replaced by a SyncedBatchNorm holding the same parameters and statistics
    (the state dict keeps its keys); returns module."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum, process_group).train(child.training)
            synced.weight, synced.bias = child.weight, child.bias  # the same Parameters (the BNNeck's frozen bias)
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, synced)
        else:
            synchronise_batch_norms(child, process_group)
    return module


def build_model(name="resnet50", num_classes=751, last_stride=1, pretrained=False, pretrain_path="",
                stem_relu=None, center_loss=None):
    """Build a CTLModel; load pretrain_path, or with pretrained=True the default ImageNet file.

    stem_relu: None follows the original (no ReLU after the stem's bn1, IBN-a nets excepted: see
    original_stem_relu); True / False force it. A checkpoint that records its stem overrides it when loaded."""
    if name not in ARCHS:
        raise ValueError(f"unknown model name {name!r}: choose one of {', '.join(ARCHS)}")
    if last_stride not in (1, 2):
        raise ValueError(f"last stride must be 1 or 2, got {last_stride}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = CTLModel(name, num_classes, last_stride, stem_relu)
    path = pretrain_path
    if pretrained and not path:
        path = MODELS_DIR / ARCHS[name][2]
        if not path.is_file():
            raise WeightError(
                f"--MODEL.PRETRAINED true needs the ImageNet weights of {name} at {path}: download "
                f"{ARCHS[name][3]}{ARCHS[name][2]} by hand and put the file there (nothing is downloaded "
                f"automatically), "
                f"or name another file with --MODEL.PRETRAIN_PATH, "
                f"or train from scratch with --MODEL.PRETRAINED false")
    if path:
        load_weights(model, path, center_loss)
    return model


def _require_file(path):
    """WeightError when there is no file at path, saying where to download an ImageNet file by name."""
    path = Path(path)
    if not path.is_file():
        known = {spec[2]: spec[3] + spec[2] for spec in ARCHS.values()}  # ImageNet files: say where to get them
        fetch = f" (download {known[path.name]} into {path.parent}/)" if path.name in known else ""
        raise WeightError(f"{path}: no such weight file{fetch}; or train without it: MODEL.PRETRAIN_PATH '' "
                          "MODEL.PRETRAINED False")


def _read_weights(path):
    """checkpoint.read_weights of an existing file (its kind, tensors in our keys, metadata)."""
    _require_file(path)
    return read_weights(path)


def _infer_arch(state):
    """Architecture name from backbone.* keys, or None when the block counts match no ResNet."""
    counts = [0, 0, 0, 0]
    for key in state:
        found = re.match(r"backbone\.layer([1-4])\.(\d+)\.", key)
        if found:
            layer, block = int(found.group(1)) - 1, int(found.group(2))
            counts[layer] = max(counts[layer], block + 1)
    name = _DEPTHS.get((tuple(counts), "backbone.layer1.0.conv3.weight" in state))
    if name and "backbone.layer1.0.bn1.IN.weight" in state:
        name = name + "_ibn_a" if name + "_ibn_a" in ARCHS else None
    return name


def _apply_state(model, weights, path, center_loss=None, notes=()):
    """Copy a checkpoint.WeightFile into model (and its centers into center_loss, with the stem the file records);
    return the one-line summary."""
    notes = list(notes) + ([f"skipped {', '.join(weights.dropped)} (ImageNet classifier)"] if weights.dropped else [])
    stem_relu = stem_relu_of(weights)
    if stem_relu is not None and stem_relu != model.stem_relu:
        model.backbone.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        notes.append(f"stem {'with' if stem_relu else 'without'} ReLU to match the file")
    loadable = _loadable_tensors(model, weights.state, path, notes)
    model.load_state_dict(loadable, strict=False)
    loaded = f"{len(loadable)} tensors" + _load_centers(center_loss, weights.centers, path, notes)
    fresh = [name for name in ("bn", "classifier") if not any(k.startswith(name + ".") for k in loadable)]
    if fresh:
        notes.append("fresh " + " and ".join(fresh))
    summary = f"loaded {path} ({weights.kind}): {loaded}" + "".join("; " + n for n in notes)
    print(summary)
    return summary


def _loadable_tensors(model, state, path, notes):
    """The tensors of state that fit model (a classifier for another identity count is skipped, with a note);
    WeightError when the keys or a shape say it is another network."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    # old torchvision files predate num_batches_tracked; the model's own counter is kept then
    missing = [k for k in own if k.startswith("backbone.") and k not in state
               and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        found = _infer_arch(state)
        hint = f" (the file looks like {found}, the model is {model.name})" if found else ""
        listed = ", ".join((["unexpected " + k for k in unexpected] + ["missing " + k for k in missing])[:3])
        raise WeightError(f"{path}: does not fit the model{hint}: {len(unexpected)} unexpected and "
                          f"{len(missing)} missing keys, e.g. {listed}")
    loadable = {}
    for key, value in state.items():
        if value.shape == own[key].shape:
            loadable[key] = value
        elif key == "classifier.weight" and value.shape[1:] == own[key].shape[1:]:
            notes.append(f"skipped classifier.weight: {value.shape[0]} identities in the file, "
                         f"{own[key].shape[0]} in the model")
        else:
            raise WeightError(f"{path}: shape mismatch for {key}: file {tuple(value.shape)}, "
                              f"model {tuple(own[key].shape)}")
    return loadable


def _load_centers(center_loss, centers, path, notes):
    """Copy the file's center-loss centers when they fit; ' + centers' when loaded, '' otherwise."""
    if center_loss is None or centers is None:
        return ""
    wanted = center_loss.centers.shape
    if centers.shape == wanted:
        with torch.no_grad():
            center_loss.centers.copy_(centers)
        return " + centers"
    if centers.shape[1:] != wanted[1:]:
        raise WeightError(f"{path}: shape mismatch for center_loss.centers: file {tuple(centers.shape)}, "
                          f"model {tuple(wanted)}")
    notes.append(f"skipped centers: {centers.shape[0]} identities in the file, {wanted[0]} here")
    return ""


def load_weights(model, path, center_loss=None):
    """Load any supported weight file into model (centers into center_loss); return the summary."""
    return _apply_state(model, _read_weights(path), path, center_loss)


def model_from_checkpoint(path, center_loss=None):
    """Build the architecture a checkpoint (ours or an original .ckpt) was made with, load it, eval mode; the
    model carries the input size and normalisation it was trained with (input_size, pixel_mean, pixel_std)."""
    weights = _read_weights(path)
    name, last_stride = recorded_architecture(weights)
    name = name or _infer_arch(weights.state)
    if name is None:
        raise WeightError(f"{path}: cannot tell which ResNet the backbone keys belong to")
    num_classes = weights.state["classifier.weight"].shape[0] if "classifier.weight" in weights.state else 1
    stem_relu = stem_relu_of(weights)
    # a plain state dict does not record its stem: assume the torchvision stem, with the ReLU
    model = build_model(name, num_classes, last_stride, stem_relu=True if stem_relu is None else stem_relu)
    built = (f"built {name}, {num_classes} identities, last stride {last_stride}, "
             f"stem {'with' if model.stem_relu else 'without'} ReLU")
    _apply_state(model, weights, path, center_loss, notes=[built])
    size, model.pixel_mean, model.pixel_std = trained_inputs(weights)
    model.input_size = list(size) if size else None
    return model.eval()
