"""Losses of the centroid method: label-smoothed cross-entropy, batch-hard triplet, Centroid Triplet Loss,
center loss, and their weighted total. All distances are computed in float32, outside autocast.

Every loss takes is_real [B] (bool, None = all real): the all-zero "mock" images that pad a short identity
when the sampler does not resample (specs.BatchSpec(use_resampling=False)) are masked as the original's
training_step masks them. Masks are weights, not indices, so no loss reads a value back to the host.
What they cost against the model's step: `python bench.py --stages losses`.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.metrics import DISTANCES, squared_distances


def _no_autocast(tensor):
    """A context that turns autocast off on tensor's device, so distances stay float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def pairwise_distance(x, y, distance="euclidean"):
    """[..., M, D] x [..., N, D] -> [..., M, N] float32 distances: Euclidean (not squared) or 1 - cos."""
    x, y = x.float(), y.float()
    if distance == "euclidean":
        # the clamp keeps sqrt and its gradient finite at zero distance (gradient 0 there)
        return squared_distances(x, y).clamp_min(1e-12).sqrt()
    if distance == "cosine":
        cos = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)
        return (1 - cos).clamp_min(0)
    raise ValueError(f"unknown distance {distance!r}: use one of {', '.join(DISTANCES)}")


def _real_mean(values, is_real):
    """Mean of values [N] over the rows where is_real is True (all rows when None)."""
    if is_real is None:
        return values.mean()
    weight = is_real.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1)


def cross_entropy_label_smooth(logits, targets, epsilon=0.1, is_real=None):
    """Cross-entropy against (1 - epsilon) * onehot + epsilon / C, averaged over the (real) images."""
    losses = F.cross_entropy(logits.float(), targets, label_smoothing=epsilon, reduction="none")
    return _real_mean(losses, is_real)


def batch_hard_triplet_loss(feats, pids, margin=0.5, distance="euclidean", is_real=None):
    """mean_a max(0, max_{p: same id, p != a} d(a, p) - min_{n: other id} d(a, n) + margin).

    With is_real, the mean runs over the real anchors only, while mock images stay candidates for the
    hardest positive and negative, as in the original (its TripletLoss(mask=isReal))."""
    with _no_autocast(feats):
        dist = pairwise_distance(feats, feats, distance)  # [N, N]
        same = pids[:, None] == pids[None, :]
        others = ~torch.eye(len(pids), dtype=torch.bool, device=feats.device)
        # distances are >= 0, so a row without positives gets d_ap = 0
        dist_ap = (dist * (same & others)).amax(dim=1)
        # no negative at all (one identity): d_an = inf and the term is 0
        dist_an = dist.masked_fill(same, float("inf")).amin(dim=1)
        return _real_mean(F.relu(dist_ap - dist_an + margin), is_real)


def centroid_triplet_loss(feats, pids, num_instances, margin=0.5, distance="euclidean", check_layout=True,
                          is_real=None):
    """Centroid Triplet Loss over an identity-major batch of P identities x K = num_instances images.

    For identity p and slot r: query q_pr = x_pr, centroid c_pr = (sum_k x_pk - x_pr) / (K - 1), the mean
    of the identity's other K - 1 images. Slot r forms the set S_r = {q_1r..q_Pr, c_1r..c_Pr}; every
    a in S_r is an anchor whose positive a' is its partner (c_pr for q_pr, q_pr for c_pr) and whose
    negatives are the members of S_r of other identities (their queries and centroids):

        L = 1 / (2 P K) * sum_r sum_{a in S_r} max(0, d(a, a') - min_{b in S_r, id(b) != id(a)} d(a, b) + m)

    i.e. the batch-hard triplet loss on each slot's queries + centroids (labels repeated), averaged over
    the K slots, as the original centroids-reid computes it; here all slots at once.

    With is_real [B], as the original's masks: a centroid is the mean of the identity's other *real* images;
    slot r of an identity whose image r is a mock has neither query nor centroid (not an anchor, not a
    negative); each slot's loss is the mean over its anchors, and the slots with fewer than two identities
    are left out of the mean over slots.
    """
    num, dim = feats.shape
    if num_instances < 2:
        raise ValueError(f"the Centroid Triplet Loss needs K >= 2 images per identity, got K = {num_instances}")
    if num % num_instances:
        raise ValueError(f"batch of {num} is not identities x K = {num_instances} images")
    num_ids = num // num_instances
    id_pids = pids.view(num_ids, num_instances)[:, 0]  # [P]
    # the check reads a device value (a host sync): train.py skips it, its PK sampler guarantees the layout
    if check_layout and (pids.view(num_ids, num_instances) != id_pids[:, None]).any():
        raise ValueError(f"the batch must be identity-major: {num_instances} consecutive images per identity")
    with _no_autocast(feats):
        x = feats.float().view(num_ids, num_instances, dim)  # [P, K, D]
        real = (torch.ones(num_ids, num_instances, device=feats.device) if is_real is None
                else is_real.view(num_ids, num_instances).float())  # [P, K]
        num_real = real.sum(dim=1, keepdim=True)  # [P, 1]
        others = num_real - real  # [P, K]: real images besides image r
        real_sum = (real[..., None] * x).sum(dim=1, keepdim=True)  # [P, 1, D]
        centroids = (real_sum - real[..., None] * x) / others.clamp_min(1)[..., None]  # [P, K, D]
        valid = (real * (others > 0)).t().repeat(1, 2)  # [K, 2P]: slot r of the identity has query and centroid
        slots = torch.cat([x, centroids], dim=0).transpose(0, 1)  # [K, 2P, D]: queries, then centroids
        dist = pairwise_distance(slots, slots, distance)  # [K, 2P, 2P]
        members = torch.arange(2 * num_ids, device=feats.device)
        partner = (members + num_ids) % (2 * num_ids)
        dist_ap = dist[:, members, partner]  # [K, 2P]
        labels = id_pids.repeat(2)  # [2P]
        not_negative = (labels[:, None] == labels[None, :]) | (valid[:, None, :] == 0)  # [K, 2P, 2P]
        dist_an = dist.masked_fill(not_negative, float("inf")).amin(dim=-1)  # [K, 2P]
        losses = F.relu(dist_ap - dist_an + margin) * valid  # [K, 2P]
        anchors = valid.sum(dim=1)  # [K]: 2 x identities present in the slot
        slot_loss = losses.sum(dim=1) / anchors.clamp_min(1)  # [K]
        used = (anchors >= 4).float()  # the original skips a slot with fewer than two identities
        return (slot_loss * used).sum() / used.sum().clamp_min(1)


class CenterLoss(nn.Module):
    """Center loss: mean over the batch of ||f - c_y||^2 with learnable centers [C, D] ~ N(0, 1)."""

    def __init__(self, num_classes, feat_dim):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats, pids, is_real=None):
        """feats [B, D], pids [B] -> 0-d float32 loss (mean over the real images)."""
        with _no_autocast(feats):
            return _real_mean((feats.float() - self.centers[pids].float()).pow(2).sum(dim=1), is_real)


def build_center_optimizer(center_loss, lr=0.5):
    """The centers' own SGD optimizer (lr --SOLVER.CENTER_LR)."""
    return torch.optim.SGD(center_loss.parameters(), lr=lr)


def scale_center_grads(center_loss, center_weight):
    """Multiply the centers' gradients by 1 / center_weight before their optimizer step.

    The total holds center_weight * center loss; undoing the weight lets the centers learn at their own
    lr whatever the weight. With a GradScaler, unscale the center optimizer first.
    """
    if center_weight <= 0:
        return
    for param in center_loss.parameters():
        if param.grad is not None:
            param.grad.mul_(1.0 / center_weight)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the four losses are computed and weighted: K images per identity, the triplets' margin and distance, the
    cross-entropy's label smoothing, each loss's weight (train.loss_spec builds it from the SOLVER keys), and
    whether the CTL checks the batch's identity-major layout (a host sync; train.py's sampler guarantees it)."""
    num_instances: int = 4
    margin: float = 0.5
    distance: str = "euclidean"
    label_smooth: float = 0.1
    ctl_weight: float = 1.0
    triplet_weight: float = 1.0
    xent_weight: float = 1.0
    center_weight: float = 0.0005
    check_layout: bool = True


def compute_losses(feat, logits, pids, center_loss, spec=LossSpec(), is_real=None):
    """Weighted total of the four losses (as spec says) and each (unweighted, detached) term for logging.

    is_real [B] (the train loader's 4th element): mock images are masked as in each loss's docstring; pass
    the model is_real too (model(images, is_real)), so that its BNNeck normalises with real images only."""
    terms = {
        "centroid_triplet": centroid_triplet_loss(feat, pids, spec.num_instances, spec.margin, spec.distance,
                                                  spec.check_layout, is_real),
        "triplet": batch_hard_triplet_loss(feat, pids, spec.margin, spec.distance, is_real),
        "xent": cross_entropy_label_smooth(logits, pids, spec.label_smooth, is_real),
        "center": center_loss(feat, pids, is_real) if center_loss is not None
        else torch.zeros((), device=feat.device),
    }
    total = (spec.ctl_weight * terms["centroid_triplet"] + spec.triplet_weight * terms["triplet"]
             + spec.xent_weight * terms["xent"] + spec.center_weight * terms["center"])
    return total, {name: value.detach() for name, value in terms.items()}
