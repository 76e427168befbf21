"""Losses: values computed by hand, the vectorised CTL against a slow loop reference, numerical safety."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import (
    CenterLoss,
    LossSpec,
    batch_hard_triplet_loss,
    build_center_optimizer,
    centroid_triplet_loss,
    compute_losses,
    cross_entropy_label_smooth,
    scale_center_grads,
)

# a rotation by atan(4/3): points given on a line become genuine 2-D features, distances unchanged
ROTATION = torch.tensor([0.6, 0.8])


def on_line(values):
    """1-D positions -> 2-D features on a rotated line (distance = |difference of positions|)."""
    return torch.tensor(values, dtype=torch.float32)[:, None] * ROTATION


def test_triplet_hand_computed():
    # id 0: a=(0,0), b=(0,1); id 1: c=(2,0), e=(2,2). d(a,b)=1, d(c,e)=2, d(a,c)=2, d(a,e)=sqrt(8),
    # d(b,c)=d(b,e)=sqrt(5). Terms: a: 1-2+.5<0 -> 0; b: 1-sqrt5+.5<0 -> 0; c: 2-min(2,sqrt5)+.5 = .5;
    # e: 2-min(sqrt8,sqrt5)+.5
    feats = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, 2.0]])
    pids = torch.tensor([0, 0, 1, 1])
    expected = (0.5 + (2 - math.sqrt(5) + 0.5)) / 4
    assert batch_hard_triplet_loss(feats, pids, margin=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_triplet_hand_computed_cosine_three_ids():
    # unit vectors at 0, 90 (id 0), 180, 270 (id 1) and 45 degrees twice (id 2); d = 1 - cos.
    # id 0 anchors: positive at 90 deg (d 1), nearest negative at 45 deg (d 1 - cos45): 1 - (1-r) + .5;
    # id 1 anchors: positive d 1 (90 deg apart); 180 deg is 135 from 45 and 90 from 90/0 -> d_an = 1: .5;
    # id 2 anchors: positive the copy (d 0), nearest negative 45 deg away (d 1 - r): 0 - (1-r) + .5
    r = math.sqrt(0.5)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [r, r], [r, r]])
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = (2 * (1 - (1 - r) + 0.5) + 2 * 0.5 + 2 * (0 - (1 - r) + 0.5)) / 6
    value = batch_hard_triplet_loss(feats, pids, margin=0.5, distance="cosine").item()
    assert value == pytest.approx(expected, abs=1e-6)


def test_centroid_triplet_hand_computed_k3():
    # positions: id 0 at 0, 1, 2; id 1 at 2.5, 3, 6 (K = 3). Centroid of slot r = mean of the other two:
    # id 0: 1.5, 1, 0.5; id 1: 4.5, 4.25, 2.75. Slot sets {q0, c0, q1, c1} and their hinge terms:
    # slot 0 {0, 1.5, 2.5, 4.5}: 0, 1.5-1+.5=1, 2-1+.5=1.5, 0              -> 2.5
    # slot 1 {1, 1, 3, 4.25}: all terms <= 0                                 -> 0
    # slot 2 {2, .5, 6, 2.75}: 1.5-.75+.5=1.25, 0, 0, 3.25-.75+.5=3            -> 4.25
    # L = (2.5 + 0 + 4.25) / (2 * P * K = 12)
    feats = on_line([0, 1, 2, 2.5, 3, 6])
    pids = torch.tensor([7, 7, 7, 3, 3, 3])
    value = centroid_triplet_loss(feats, pids, num_instances=3, margin=0.5).item()
    assert value == pytest.approx(6.75 / 12, abs=1e-5)


def test_cross_entropy_label_smooth_hand_computed():
    # row 0: logits (2, 0), target 0, t = (.95, .05): loss = log(1 + e^-2) + .05 * 2
    # row 1: logits (0, 0), target 1: loss = log 2
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = (math.log(1 + math.exp(-2)) + 0.1 + math.log(2)) / 2
    value = cross_entropy_label_smooth(logits, torch.tensor([0, 1]), epsilon=0.1).item()
    assert value == pytest.approx(expected, abs=1e-6)
    # epsilon = 0 is the plain cross-entropy: row 0 alone gives log(1 + e^-2)
    plain = cross_entropy_label_smooth(logits[:1], torch.tensor([0]), epsilon=0.0).item()
    assert plain == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_center_loss_hand_computed():
    center_loss = CenterLoss(num_classes=3, feat_dim=2)
    with torch.no_grad():
        center_loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]))
    feats = torch.tensor([[1.0, 0.0], [1.0, 3.0], [3.0, 3.0]])
    # squared distances to own centers: 1, 4, 9 -> mean 14 / 3
    assert center_loss(feats, torch.tensor([0, 1, 2])).item() == pytest.approx(14 / 3, abs=1e-6)


def slow_distance(a, b, distance):
    """One distance between two vectors, written directly."""
    if distance == "euclidean":
        return torch.linalg.vector_norm(a - b)
    return 1 - F.cosine_similarity(a, b, dim=0)


def slow_centroid_triplet(feats, num_ids, num_instances, margin, distance):
    """Loop-by-loop CTL: per slot, queries and leave-one-out centroids, batch-hard on each member."""
    slot_losses = []
    for slot in range(num_instances):
        members = []  # (vector, identity, index of its partner)
        for ident in range(num_ids):
            images = [feats[ident * num_instances + k] for k in range(num_instances)]
            others = [images[k] for k in range(num_instances) if k != slot]
            centroid = sum(others) / len(others)
            members.append((images[slot], ident, len(members) + 1))
            members.append((centroid, ident, len(members) - 1))
        hinges = []
        for vector, ident, partner in members:
            d_ap = slow_distance(vector, members[partner][0], distance)
            d_an = min((slow_distance(vector, other, distance) for other, other_id, _ in members
                        if other_id != ident), key=lambda d: d.item())
            hinges.append(torch.clamp(d_ap - d_an + margin, min=0))
        slot_losses.append(sum(hinges) / len(hinges))
    return sum(slot_losses) / len(slot_losses)


def slow_batch_hard(feats, pids, margin, distance):
    """Loop-by-loop batch-hard triplet loss."""
    hinges = []
    for i in range(len(feats)):
        positives = [slow_distance(feats[i], feats[j], distance) for j in range(len(feats))
                     if j != i and pids[j] == pids[i]]
        negatives = [slow_distance(feats[i], feats[j], distance) for j in range(len(feats)) if pids[j] != pids[i]]
        d_ap = max(positives, key=lambda d: d.item())
        d_an = min(negatives, key=lambda d: d.item())
        hinges.append(torch.clamp(d_ap - d_an + margin, min=0))
    return sum(hinges) / len(hinges)


@pytest.mark.parametrize("num_instances", [2, 4, 6])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_centroid_triplet_matches_loop_reference(num_instances, distance):
    generator = torch.Generator().manual_seed(num_instances)
    num_ids, dim = 4, 8
    # a margin that keeps some hinges active and others at 0
    margin = 0.5 if distance == "euclidean" else 0.2
    feats = torch.randn(num_ids * num_instances, dim, generator=generator)
    pids = torch.tensor([11, 3, 8, 5]).repeat_interleave(num_instances)
    fast_in = feats.clone().requires_grad_()
    slow_in = feats.clone().requires_grad_()
    fast = centroid_triplet_loss(fast_in, pids, num_instances, margin, distance)
    slow = slow_centroid_triplet(slow_in, num_ids, num_instances, margin, distance)
    assert 0 < slow.item()
    assert fast.item() == pytest.approx(slow.item(), abs=1e-5)
    fast.backward()
    slow.backward()
    assert torch.allclose(fast_in.grad, slow_in.grad, atol=1e-5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_matches_loop_reference(distance):
    generator = torch.Generator().manual_seed(5)
    feats = torch.randn(12, 6, generator=generator)
    pids = torch.tensor([4, 4, 4, 1, 1, 1, 9, 9, 9, 2, 2, 2])
    fast_in, slow_in = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    fast = batch_hard_triplet_loss(fast_in, pids, 0.5, distance)
    slow = slow_batch_hard(slow_in, pids, 0.5, distance)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-5)
    fast.backward()
    slow.backward()
    assert torch.allclose(fast_in.grad, slow_in.grad, atol=1e-5)


def test_compute_losses_total_is_weighted_sum_and_terms_are_detached():
    generator = torch.Generator().manual_seed(0)
    feat = torch.randn(12, 16, generator=generator, requires_grad=True)
    logits = torch.randn(12, 5, generator=generator, requires_grad=True)
    pids = torch.arange(3).repeat_interleave(4)
    center_loss = CenterLoss(5, 16)
    weights = dict(ctl_weight=0.7, triplet_weight=1.3, xent_weight=0.5, center_weight=0.01)
    total, terms = compute_losses(feat, logits, pids, center_loss, LossSpec(4, **weights))
    assert set(terms) == {"centroid_triplet", "triplet", "xent", "center"}
    assert all(t.dim() == 0 and not t.requires_grad for t in terms.values())
    expected = (0.7 * terms["centroid_triplet"] + 1.3 * terms["triplet"] + 0.5 * terms["xent"]
                + 0.01 * terms["center"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["center"].item() == pytest.approx(center_loss(feat, pids).item(), rel=1e-6)
    assert terms["xent"].item() == pytest.approx(cross_entropy_label_smooth(logits, pids).item(), rel=1e-6)


def test_scale_center_grads_makes_center_step_independent_of_weight():
    generator = torch.Generator().manual_seed(1)
    feat = torch.randn(8, 4, generator=generator)
    logits = torch.randn(8, 3, generator=generator)
    pids = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])
    moved = []
    for weight in (0.0005, 0.1):
        torch.manual_seed(0)
        center_loss = CenterLoss(3, 4)
        start = center_loss.centers.detach().clone()
        optimizer = build_center_optimizer(center_loss, lr=0.5)
        total, _ = compute_losses(feat, logits, pids, center_loss, LossSpec(4, center_weight=weight))
        total.backward()
        scale_center_grads(center_loss, weight)
        # the scaled gradient is the gradient of the unweighted center loss
        own = torch.autograd.grad(center_loss(feat, pids), center_loss.centers)[0]
        assert torch.allclose(center_loss.centers.grad, own, atol=1e-5)
        optimizer.step()
        moved.append(center_loss.centers.detach() - start)
    assert torch.allclose(moved[0], moved[1], atol=1e-5)
    assert moved[0][1].abs().max() == 0  # identity 1 is not in the batch: its center stays


def identical_copies_batch(num_instances=4, dim=32):
    """Identity 0: K identical copies; identity 1: random; identity 2: all zeros."""
    generator = torch.Generator().manual_seed(2)
    copy = torch.randn(dim, generator=generator).expand(num_instances, dim)
    feats = torch.cat([copy, torch.randn(num_instances, dim, generator=generator),
                       torch.zeros(num_instances, dim)])
    return feats, torch.arange(3).repeat_interleave(num_instances)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_no_nan_from_zero_distances_and_identical_copies(distance):
    feats, pids = identical_copies_batch()
    feats.requires_grad_()
    for loss in (centroid_triplet_loss(feats, pids, 4, 0.5, distance),
                 batch_hard_triplet_loss(feats, pids, 0.5, distance)):
        (grad,) = torch.autograd.grad(loss, feats)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_single_identity_batch_gives_zero_not_nan():
    feats = torch.randn(4, 8, requires_grad=True)
    pids = torch.zeros(4, dtype=torch.long)
    for loss in (centroid_triplet_loss(feats, pids, 4), batch_hard_triplet_loss(feats, pids)):
        (grad,) = torch.autograd.grad(loss, feats)
        assert loss.item() == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_under_autocast_are_safe(dtype):
    # ResNet features of this size overflow fp16 once squared and summed (300^2 * 64 > 65504)
    feats, pids = identical_copies_batch(dim=64)
    feats = (feats.abs() * 300).to(dtype).requires_grad_()
    logits = torch.randn(12, 3).to(dtype).requires_grad_()
    center_loss = CenterLoss(3, 64)
    with torch.autocast("cpu", dtype=dtype):
        total, terms = compute_losses(feats, logits, pids, center_loss, LossSpec(4))
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(t) for t in terms.values())
    assert torch.isfinite(feats.grad).all() and torch.isfinite(center_loss.centers.grad).all()
    # the same half-precision values in float32 without autocast give the same losses
    _, reference = compute_losses(feats.detach().float(), logits.detach().float(), pids, center_loss, LossSpec(4))
    for name in terms:
        assert terms[name].item() == pytest.approx(reference[name].item(), rel=1e-5)


def test_ctl_refuses_bad_batches():
    feats = torch.randn(8, 4)
    with pytest.raises(ValueError, match="K >= 2"):
        centroid_triplet_loss(feats, torch.arange(8), 1)
    with pytest.raises(ValueError, match="not identities x K"):
        centroid_triplet_loss(feats, torch.arange(8), 3)
    with pytest.raises(ValueError, match="identity-major"):
        centroid_triplet_loss(feats, torch.tensor([0, 1, 0, 1, 2, 3, 2, 3]), 2)
    with pytest.raises(ValueError, match="unknown distance"):
        batch_hard_triplet_loss(feats, torch.arange(4).repeat_interleave(2), distance="manhattan")


# ------------------------------------------------------------------------------------------------
# Mock images (use_resampling=False): masked as the original's training_step masks them


def original_masked_losses(feats, logits, pids, is_real, num_instances, margin=0.5, epsilon=0.1):
    """The original's training_step on one batch, written as loops: (CTL, cross-entropy, batch-hard triplet).
    A slot's query and centroid exist only where the slot's image is real; a centroid is the mean of the
    identity's other real images; a slot with < 2 identities is skipped."""
    num_ids = len(feats) // num_instances
    slot_losses = []
    for slot in range(num_instances):
        queries, centroids, labels = [], [], []
        for ident in range(num_ids):
            rows = range(ident * num_instances, (ident + 1) * num_instances)
            query = ident * num_instances + slot
            others = [feats[j] for j in rows if j != query and is_real[j]]
            if is_real[query] and others:
                queries.append(feats[query])
                centroids.append(sum(others) / len(others))
                labels.append(int(pids[query]))
        if len(labels) > 1:
            slot_losses.append(slow_batch_hard(torch.stack(queries + centroids), labels + labels, margin, "euclidean"))
    ctl = sum(slot_losses) / len(slot_losses)
    real = [i for i in range(len(feats)) if is_real[i]]
    log_probs = F.log_softmax(logits[real], dim=1)
    targets = torch.full_like(log_probs, epsilon / logits.shape[1])
    targets[torch.arange(len(real)), pids[real]] += 1 - epsilon
    xent = (-targets * log_probs).mean(0).sum()
    hinges = []  # TripletLoss(mask=isReal): mining over every image, mean over the real anchors
    for i in real:
        d_ap = max(slow_distance(feats[i], feats[j], "euclidean") for j in range(len(feats))
                   if j != i and pids[j] == pids[i])
        d_an = min(slow_distance(feats[i], feats[j], "euclidean") for j in range(len(feats)) if pids[j] != pids[i])
        hinges.append(torch.clamp(d_ap - d_an + margin, min=0))
    return ctl, xent, sum(hinges) / len(hinges)


def short_identity_batch(mock_seed):
    """P = 4 identities x K = 4, identity 1 with 2 real images and 2 mocks, identity 3 with 3 + 1; the mocks'
    features and logits drawn from mock_seed."""
    generator = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(16, 8, generator=generator), torch.randn(16, 6, generator=generator)
    is_real = torch.ones(16, dtype=torch.bool)
    is_real[[6, 7, 15]] = False
    mock = torch.Generator().manual_seed(mock_seed)
    feats[~is_real] = 3 * torch.randn(3, 8, generator=mock)
    logits[~is_real] = 3 * torch.randn(3, 6, generator=mock)
    return feats, logits, torch.tensor([5, 2, 0, 4]).repeat_interleave(4), is_real


def test_mock_images_change_neither_ctl_nor_cross_entropy_nor_center():
    center_loss = CenterLoss(6, 8)
    terms = []
    for mock_seed in (1, 2):
        feats, logits, pids, is_real = short_identity_batch(mock_seed)
        _, found = compute_losses(feats, logits, pids, center_loss, LossSpec(4), is_real=is_real)
        ctl, xent, triplet = original_masked_losses(feats, logits, pids, is_real, 4)
        assert found["centroid_triplet"].item() == pytest.approx(ctl.item(), abs=1e-5)
        assert found["xent"].item() == pytest.approx(xent.item(), abs=1e-5)
        assert found["triplet"].item() == pytest.approx(triplet.item(), abs=1e-5)
        real = is_real.nonzero().flatten()
        assert found["center"].item() == pytest.approx(center_loss(feats[real], pids[real]).item(), rel=1e-6)
        terms.append(found)
    for name in ("centroid_triplet", "xent", "center"):
        assert terms[0][name].item() == pytest.approx(terms[1][name].item(), abs=1e-6)
    feats.requires_grad_(), logits.requires_grad_()
    total, _ = compute_losses(feats, logits, pids, center_loss, LossSpec(4, triplet_weight=0, center_weight=1),
                              is_real=is_real)
    total.backward()  # the triplet term left out: mocks are hardest positives / negatives there, as in the original
    assert total > 0 and (feats.grad[~is_real] == 0).all() and (logits.grad[~is_real] == 0).all()
    unmasked = compute_losses(feats, logits, pids, center_loss, LossSpec(4))[1]
    assert unmasked["centroid_triplet"].item() != pytest.approx(terms[1]["centroid_triplet"].item(), abs=1e-3)


def test_all_real_is_the_same_as_no_mask():
    feats, logits, pids, _ = short_identity_batch(1)
    center_loss = CenterLoss(6, 8)
    _, plain = compute_losses(feats, logits, pids, center_loss, LossSpec(4))
    _, masked = compute_losses(feats, logits, pids, center_loss, LossSpec(4), is_real=torch.ones(16, dtype=torch.bool))
    for name in plain:
        assert masked[name].item() == pytest.approx(plain[name].item(), rel=1e-6)
