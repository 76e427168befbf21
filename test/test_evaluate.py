"""The evaluation: support/metrics.py's exact metrics (hand-made and against a slow reference) and edge cases,
support/centroids.py's centroids, evaluate.py's features, table and CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from bench_runs import printed_metrics, run_bench

import evaluate as ev
from support import centroids, metrics
from support.centroids import EvaluationOptions
from support.metrics import Split
from support.synthetic import synthetic_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# A slow, obvious reference: one query at a time, a stable argsort of the float32 row

def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, camera_agnostic=False):
    """Per-query loop with np.argsort(kind='stable'); returns the same keys as evaluate_rank."""
    distmat = np.asarray(distmat, dtype=np.float32)
    aps, traps, inps, cmcs = [], [], [], []
    for q in range(len(q_pids)):
        order = np.argsort(distmat[q], kind="stable")
        same_pid = g_pids[order] == q_pids[q]
        keep = np.ones_like(same_pid) if camera_agnostic else ~(same_pid & (g_camids[order] == q_camids[q]))
        hits = same_pid[keep]
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1                                        # 1-based
        k = np.arange(1, len(ranks) + 1)
        aps.append(np.mean(k / ranks))
        prev = np.where(ranks > 1, (k - 1) / np.maximum(ranks - 1, 1), 1.0)
        traps.append(np.mean((k / ranks + prev) / 2))
        inps.append(len(ranks) / ranks[-1])
        cmcs.append(np.arange(1, max_rank + 1) >= ranks[0])
    return {"mAP": np.mean(aps), "mAP_trapezoid": np.mean(traps), "mINP": np.mean(inps),
            "cmc": np.mean(cmcs, axis=0), "num_valid_queries": len(aps),
            "num_skipped_queries": len(q_pids) - len(aps)}


def random_problem(rng, num_query=40, num_gallery=300, num_ids=12, num_cams=3, levels=25):
    """Few ids and cameras (many matches and removals); quantised distances (many ties), some negative
    and some -0.0. Skipped queries: ids >= num_ids are not in the gallery, id 0 only in camera 0."""
    q_pids = rng.integers(0, num_ids + 2, num_query)
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_camids = rng.integers(0, num_cams, num_query)
    g_camids = rng.integers(0, num_cams, num_gallery)
    q_camids[q_pids == 0] = 0
    g_camids[g_pids == 0] = 0
    distmat = (rng.integers(-3, levels, (num_query, num_gallery)) / 7).astype(np.float32)
    distmat[rng.random(distmat.shape) < 0.05] = -0.0
    return distmat, q_pids, g_pids, q_camids, g_camids


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, **kwargs):
    """metrics.evaluate_rank with the labels in torchreid's order, as the reference takes them."""
    return metrics.evaluate_rank(distmat, Split(None, q_pids, q_camids), Split(None, g_pids, g_camids), **kwargs)


def evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, **options):
    """centroids.evaluate_centroids of the six arrays, options as EvaluationOptions' fields."""
    return centroids.evaluate_centroids(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids),
                                        EvaluationOptions(**options))


def evaluate_features(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, raw_feats=False, **options):
    """centroids.evaluate_features of the six arrays, options as EvaluationOptions' fields."""
    return centroids.evaluate_features(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids),
                                       EvaluationOptions(**options), raw_feats)


def evaluate_reranked(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, raw_feats=False, **options):
    """centroids.evaluate_reranked of the six arrays, options as EvaluationOptions' fields."""
    return centroids.evaluate_reranked(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids),
                                       EvaluationOptions(**options), raw_feats)


def assert_same(res, ref):
    """Agreement to 1e-6 on every metric the reference computes."""
    for key in ("mAP", "mAP_trapezoid", "mINP"):
        assert abs(res[key] - ref[key]) <= 1e-6, (key, res[key], ref[key])
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    assert res["num_valid_queries"] == ref["num_valid_queries"]
    assert res["num_skipped_queries"] == ref["num_skipped_queries"]


# ---------------------------------------------------------------------------------------------------
# Ranking metrics

def test_hand_made_ranking():
    # query 0 (pid 1, cam 0): its same-camera image (0.05) is removed; true matches then rank 2 and 4.
    # query 1 (pid 2, cam 0): its match ranks first.
    distmat = np.array([[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=np.float32)
    g_pids = np.array([1, 2, 1, 3, 1, 4, 5])
    g_camids = np.array([0, 1, 1, 1, 1, 1, 1])
    res = evaluate_rank(distmat, np.array([1, 2]), g_pids, np.array([0, 0]), g_camids, max_rank=5)
    ap0 = (1 / 2 + 2 / 4) / 2                               # precisions at the hits
    trap0 = ((0 / 1 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2  # Market-1501 official trapezoid
    assert res["mAP"] == pytest.approx((ap0 + 1) / 2)
    assert res["mAP_trapezoid"] == pytest.approx((trap0 + 1) / 2)
    assert res["mAP_trapezoid"] < res["mAP"]
    assert res["mINP"] == pytest.approx((2 / 4 + 1) / 2)
    np.testing.assert_allclose(res["cmc"], [0.5, 1, 1, 1, 1])
    assert res["num_valid_queries"] == 2 and res["num_skipped_queries"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_slow_reference(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng)
    ref = reference_rank(*problem, max_rank=20)
    assert 0 < ref["num_skipped_queries"] < len(problem[1])  # the problem exercises skipping
    assert_same(evaluate_rank(*problem, max_rank=20), ref)  # one chunk
    assert metrics._chunk_shape(300, metrics.BYTES_PER_ITEM * metrics.MIN_ROWS * 7) == (metrics.MIN_ROWS, 7)
    assert_same(evaluate_rank(*problem, max_rank=20, chunk_bytes=metrics.BYTES_PER_ITEM * metrics.MIN_ROWS * 7), ref)
    monkeypatch.setattr(metrics, "MIN_ROWS", 1)                    # whole rows, 3 queries per chunk
    assert metrics._chunk_shape(300, metrics.BYTES_PER_ITEM * 900) == (3, 300)
    assert_same(evaluate_rank(*problem, max_rank=20, chunk_bytes=metrics.BYTES_PER_ITEM * 900), ref)
    assert_same(evaluate_rank(*problem, max_rank=20, camera_agnostic=True),
                reference_rank(*problem, max_rank=20, camera_agnostic=True))


def test_torch_inputs_and_float64_compare_as_float32():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(np.random.default_rng(7))
    ref = reference_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    tensors = [torch.from_numpy(x) for x in (distmat, q_pids, g_pids, q_camids, g_camids)]
    assert_same(evaluate_rank(*tensors), ref)
    assert_same(evaluate_rank(distmat.astype(np.float64), q_pids, g_pids, q_camids, g_camids), ref)


def test_skipped_queries_are_counted_not_scored():
    # query 1's only match is in its own camera: skipped; query 0 is perfect
    distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=np.float32)
    res = evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 1]), np.array([1, 1, 1]))
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 1
    assert res["mAP"] == 1.0 and res["cmc"][0] == 1.0


def test_no_valid_query_says_why_and_what_to_do():
    distmat = np.random.default_rng(0).random((4, 10)).astype(np.float32)
    pids = np.arange(10) % 4
    with pytest.raises(metrics.EvaluationError) as info:
        evaluate_rank(distmat, np.arange(4), pids, np.zeros(4, int), np.zeros(10, int))
    message = str(info.value)
    assert "single-camera" in message and "camera_agnostic=True" in message
    assert "--TEST.CAMERA_AGNOSTIC true" in message
    res = evaluate_rank(distmat, np.arange(4), pids, np.zeros(4, int), np.zeros(10, int), camera_agnostic=True)
    assert res["num_valid_queries"] == 4
    with pytest.raises(metrics.EvaluationError, match="no query identity appears in the gallery"):
        evaluate_rank(distmat, np.arange(4) + 100, pids, np.zeros(4, int), np.ones(10, int))


def test_short_gallery_gives_a_monotone_cmc():
    # 3 gallery items, max_rank 50 (torchreid/fast-reid crash or return a non-monotone CMC here)
    distmat = np.array([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]], dtype=np.float32)
    args = (np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]))
    res = evaluate_rank(distmat, *args, max_rank=50)
    assert len(res["cmc"]) == 50 and np.all(np.diff(res["cmc"]) >= 0)
    np.testing.assert_allclose(res["cmc"][:3], [0.0, 0.5, 1.0])  # query 0's hit at rank 3, query 1's at 2
    assert res["cmc"][-1] == 1.0
    assert_same(res, reference_rank(distmat, *args, max_rank=50))


def test_bad_inputs_raise_clear_errors():
    distmat = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(metrics.EvaluationError, match="g_pids has 2 entries"):
        evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1, 1]))
    distmat[0, 1] = np.nan
    with pytest.raises(metrics.EvaluationError, match="NaN"):
        evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]))


def test_one_removal_rule_for_pairs_grids_and_camera_sets():
    q_pids, q_cams = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    g_pids, g_cams = torch.tensor([1, 1, 2, 3]), torch.tensor([0, 1, 1, 0])
    grid = metrics.removed_items(q_pids[:, None], q_cams[:, None], g_pids[None], g_cams[None])  # as visualize, report
    assert grid.tolist() == [[True, False, False, False], [False, True, False, False], [False] * 4]
    rows, cols = torch.nonzero(torch.ones(3, 4), as_tuple=True)                   # as the rank kernel's pair lists
    assert torch.equal(metrics.removed_items(q_pids[rows], q_cams[rows], g_pids[cols], g_cams[cols]).view(3, 4), grid)
    agnostic = metrics.CameraRule(agnostic=True)
    assert not metrics.removed_items(q_pids[:, None], q_cams[:, None], g_pids[None], g_cams[None], agnostic).any()
    # the original's centroids: query cameras as bits, entries as the bit masks of the cameras they are made from
    sets = torch.tensor([0b11, 0b10, 0b10, 0b01])
    removed = metrics.removed_items(q_pids[:, None], (1 << q_cams)[:, None], g_pids[None], sets[None],
                                    metrics.CameraRule(sets=True))
    assert removed.tolist() == [[True, False, False, False], [True, True, False, False], [False] * 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_results_on_cuda():
    problem = random_problem(np.random.default_rng(3))
    cuda = [torch.as_tensor(x).cuda() for x in problem]
    assert_same(evaluate_rank(*cuda), reference_rank(*problem))


# ---------------------------------------------------------------------------------------------------
# Centroids

def unit(*rows):
    """Rows as a float32 tensor of unit vectors."""
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def two_camera_gallery():
    """q0 (pid 1, cam 0) equals its own-camera gallery image; q1 (pid 2, cam 1) is ordinary."""
    q_feats = unit([1, 0, 0], [0.6, 0.8, 0])
    g_feats = unit([0, 0, 1],      # pid 1, cam 1: far from q0
                   [1, 0, 0],      # pid 1, cam 0: identical to q0, must not enter q0's centroid
                   [0.6, 0.8, 0],  # pid 2, cam 1
                   [0, 1, 0])      # pid 2, cam 0
    return q_feats, np.array([1, 2]), np.array([0, 1]), g_feats, np.array([1, 1, 2, 2]), np.array([1, 0, 1, 0])


def test_centroids_exclude_the_query_camera_at_the_right_offsets():
    q_feats, q_pids, q_camids, g_feats, g_pids, g_camids = two_camera_gallery()
    res = evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, max_rank=2)
    # q0 (camera 0) sees pid 1's centroid from camera 1 only, [0, 0, 1] (distance 2), behind pid 2's from
    # both of its images, ~[0.32, 0.95, 0] (distance ~1.37): its match ranks 2nd. q1 (camera 1) sees pid 2's
    # centroid from camera 0, [0, 1, 0] (0.4), before pid 1's from both images (~1.15).
    assert res["mAP"] == pytest.approx((1 / 2 + 1) / 2)
    np.testing.assert_allclose(res["cmc"], [0.5, 1.0])
    # Gallery camids misaligned as by the original's bug (read from [query camids, gallery camids]
    # without the query offset) put q0's identical image into its centroid and change the answer.
    wrong_camids = np.concatenate([q_camids, g_camids])[:len(g_camids)]
    wrong = evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, wrong_camids, max_rank=2)
    assert wrong["mAP"] == pytest.approx(1.0)
    # Without cameras (fashion sets): one centroid per identity from all its images.
    flat = evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, keep_camid_centroids=False)
    assert flat["mAP"] == pytest.approx(1.0)


def test_distractors_and_unasked_identities_stay_in_the_centroid_gallery():
    q_feats = unit([1, 0, 0])
    g_feats = unit([0.5, 0.866, 0],   # pid 1 (the query's), cam 1: distance 1.0
                   [0.9, 0.436, 0],   # distractor: distance ~0.2
                   [0.9, -0.436, 0],  # distractor: ~0.2 (averaged with the first it would be [1, 0, 0])
                   [0.8, 0, 0.6])     # pid 9, which no query asks for: distance 0.4
    res = evaluate_centroids(q_feats, np.array([1]), np.array([0]), g_feats, np.array([1, 0, 0, 9]),
                             np.array([1, 0, 2, 1]), max_rank=4)
    assert res["mAP"] == pytest.approx(1 / 4)  # both distractors and pid 9 rank before the match
    np.testing.assert_allclose(res["cmc"], [0, 0, 0, 1])
    assert res["protocol"] == "standard"  # the default; the original's rule drops both (test_protocols.py)


@pytest.mark.parametrize("keep_camid_centroids", [True, False])
def test_centroids_agree_with_a_per_query_reference(keep_camid_centroids):
    gen = torch.Generator().manual_seed(0)
    g_pids = torch.randint(0, 15, (200,), generator=gen).numpy()      # 0 = distractors
    g_camids = torch.randint(0, 4, (200,), generator=gen).numpy()
    q_pids = torch.randint(1, 18, (60,), generator=gen).numpy()       # 15..17: not in the gallery
    q_camids = torch.randint(0, 4, (60,), generator=gen).numpy()
    centres = torch.randn(18, 16, generator=gen)
    g_feats = metrics.l2_normalize(centres[g_pids] + 1.5 * torch.randn(200, 16, generator=gen))
    q_feats = metrics.l2_normalize(centres[q_pids] + 1.5 * torch.randn(60, 16, generator=gen))
    res = evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids,
                             keep_camid_centroids=keep_camid_centroids, chunk_bytes=metrics.BYTES_PER_ITEM * 64 * 5)
    from test_protocols import as_numpy, loop_standard  # the standard rule's per-query loop reference
    m_ap, r1, skipped = loop_standard(*as_numpy((q_feats, q_pids, q_camids, g_feats, g_pids, g_camids)),
                                      camera_aware=keep_camid_centroids)
    assert 0.2 < m_ap < 0.95 and skipped > 0  # neither trivial nor hopeless
    assert res["mAP"] == pytest.approx(m_ap, abs=1e-6)
    assert res["cmc"][0] == pytest.approx(r1, abs=1e-9)
    assert res["num_skipped_queries"] == skipped


def original_cosine(x, y):
    """The original's get_cosine (utils/reid_metric.py): |1 - cos|, clamped at 1e-12."""
    sims = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    return (1 - sims).abs().clamp(min=1e-12)


def test_distance_func_cosine_ranks_by_cosine_without_feat_norm():
    gen = torch.Generator().manual_seed(4)
    g_pids = torch.randint(1, 12, (150,), generator=gen).numpy()
    q_pids = torch.randint(1, 12, (40,), generator=gen).numpy()
    g_camids, q_camids = np.zeros(150, dtype=np.int64), np.ones(40, dtype=np.int64)
    centres = torch.randn(12, 8, generator=gen)
    # raw embeddings whose lengths vary 25-fold: Euclidean and cosine distances rank them differently
    g_feats = (centres[g_pids] + torch.randn(150, 8, generator=gen)) * torch.rand(150, 1, generator=gen) * 5 + 0.2
    q_feats = (centres[q_pids] + torch.randn(40, 8, generator=gen)) * torch.rand(40, 1, generator=gen) * 5 + 0.2
    problem = (q_feats, q_pids, q_camids, g_feats, g_pids, g_camids)
    flags = {"normalize_centroids": False, "keep_camid_centroids": False, "centroid_protocol": "all"}  # FEAT_NORM false
    cosine = evaluate_features(*problem, distance="cosine", **flags)
    euclidean = evaluate_features(*problem, **flags)
    per_image = reference_rank(original_cosine(q_feats, g_feats).numpy(), q_pids, g_pids, q_camids, g_camids)
    assert cosine["image"]["mAP"] == pytest.approx(per_image["mAP"], abs=1e-6)
    np.testing.assert_allclose(cosine["image"]["cmc"], per_image["cmc"], atol=1e-9)
    assert abs(euclidean["image"]["mAP"] - cosine["image"]["mAP"]) > 0.01  # the two rankings differ here
    # centroids (no cameras): each identity's mean raw embedding, compared by cosine, under every rule
    c_pids = np.unique(g_pids)
    centroids = torch.stack([g_feats[torch.from_numpy(g_pids == p)].mean(0) for p in c_pids])
    per_centroid = reference_rank(original_cosine(q_feats, centroids).numpy(), q_pids, c_pids, q_camids,
                                  np.zeros(len(c_pids), dtype=np.int64))
    for key in ("centroid", "centroid_original", "centroid_original_fixed"):
        assert cosine[key]["mAP"] == pytest.approx(per_centroid["mAP"], abs=1e-6), key
    # re-ranking starts from the cosine distances too: those of the normalised embeddings
    unit_problem = (metrics.l2_normalize(q_feats), q_pids, q_camids, metrics.l2_normalize(g_feats), g_pids, g_camids)
    reranked = evaluate_reranked(*problem, distance="cosine", **flags)
    assert reranked["image"]["mAP"] == pytest.approx(evaluate_reranked(*unit_problem, **flags)["image"]["mAP"])
    with pytest.raises(metrics.EvaluationError, match="distance 'manhattan' is unknown.*euclidean, cosine"):
        evaluate_features(*problem, distance="manhattan")


def test_training_and_evaluate_py_rank_by_solver_distance_func():
    from support import config
    cfg = config.parse(["SOLVER.DISTANCE_FUNC", "cosine", "TEST.FEAT_NORM", "False"])[0]
    arguments = ev.evaluation_arguments(cfg, has_cameras=True)
    assert arguments.distance == "cosine" and arguments.normalize_centroids is False
    assert ev.evaluation_arguments(config.parse([])[0], True).distance == "euclidean"


# ---------------------------------------------------------------------------------------------------
# Features, model evaluation, the table, the benchmark

def tiny_loader(num=12, batch_size=5):
    """Images whose content depends on the pid, with pids and camids, in a fixed order."""
    gen = torch.Generator().manual_seed(1)
    pids = torch.arange(num) % 4 + 1
    imgs = pids[:, None, None, None].float() + 0.3 * torch.randn(num, 3, 8, 4, generator=gen)
    camids = torch.arange(num) % 3
    dataset = torch.utils.data.TensorDataset(imgs, pids, camids)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size), imgs, pids, camids


def tiny_model():
    """A model that behaves differently in train mode (dropout), as a real one (BN) does."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(96, 6), torch.nn.Dropout(0.5))


def test_extract_features_flip_norm_and_order():
    loader, imgs, pids, camids = tiny_loader()
    model = tiny_model().train()
    feats, out_pids, out_camids = ev.extract_features(model, loader, torch.device("cpu"), flip=True, feat_norm=True)
    assert not model.training and feats.dtype == torch.float32 and feats.shape == (12, 6)
    with torch.no_grad():
        expected = torch.nn.functional.normalize((model(imgs) + model(imgs.flip(-1))) / 2, dim=1)
    torch.testing.assert_close(feats, expected)
    np.testing.assert_array_equal(out_pids, pids.numpy())
    np.testing.assert_array_equal(out_camids, camids.numpy())
    raw, _, _ = ev.extract_features(model, loader, torch.device("cpu"), flip=False, feat_norm=False)
    torch.testing.assert_close(raw, model(imgs).detach())


def test_evaluate_splits_embeds_both_splits_and_returns_results_and_a_table(synthetic_root):
    from data import read_dataset
    from support import config
    data = read_dataset("synthetic", synthetic_root)
    cfg, _, _ = config.parse(["INPUT.SIZE_TEST", "[32, 16]", "DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten(), torch.nn.Linear(24, 6))
    results, (q_feats, g_feats) = ev.evaluate_splits(model, data, cfg, torch.device("cpu"))
    assert set(results) == {"image", "centroid"}
    assert q_feats.shape == (len(data["query"]), 6) and g_feats.shape == (len(data["gallery"]), 6)
    for res in results.values():
        assert 0 < res["mAP"] <= 1 and res["num_valid_queries"] > 0
    table = ev.format_results(results)
    lines = table.splitlines()
    assert "mAP %" in lines[0] and "mINP %" in lines[0]
    assert lines[1].startswith("per image") and lines[2].startswith("centroid")
    assert f"{100 * results['centroid']['mAP']:.2f}" in lines[2]
    # TEST.RERANK goes through the same path; lambda 1 keeps the original distances' order
    reranked, _ = ev.evaluate_splits(model, data, cfg.replace({"TEST.RERANK": True, "TEST.RERANK_LAMBDA": 1.0,
                                                               "TEST.RERANK_K1": 4, "TEST.RERANK_K2": 2}),
                                     torch.device("cpu"))
    for kind in ("image", "centroid"):
        assert reranked[kind]["mAP"] == pytest.approx(results[kind]["mAP"], abs=1e-6)


MEMORY_PROBE = """
import json, sys
import torch
from support import metrics

def status_mib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

torch.set_num_threads(2)
problem = torch.load(sys.argv[1])
rss_before, peak_before = status_mib("VmRSS"), status_mib("VmHWM")
result = metrics.evaluate_feature_ranks(metrics.Split(*problem[:3]), metrics.Split(*problem[3:]))
rows, block, workers, bound = metrics.memory_plan(len(problem[0]), len(problem[3]), "cpu")
print(json.dumps({"added_mib": status_mib("VmHWM") - rss_before, "load_peak_mib": peak_before - rss_before,
                  "bound_mib": bound / 2**20, "block": block, "mAP": result["mAP"]}))
"""


# glibc returns every block over 1 MiB to the system when it is freed: the peak resident size then follows the live
# tensors (without it, the per-thread arenas keep freed chunks, and the peak varied 125-205 MiB from run to run)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_large_gallery_memory_stays_bounded(tmp_path):
    # a fresh process holding only the embeddings: its peak resident size minus its size before the evaluation
    # bounds what the evaluation added (no peak reset needed)
    problem = synthetic_problem(400, 200_000, 20_000, 6, dim=16)
    torch.save(problem, tmp_path / "problem.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "2", **ALLOCATOR_ENV}
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "problem.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["load_peak_mib"] < 16, res  # loading left no higher peak that could hide the evaluation's
    assert res["block"] < 200_000 and res["bound_mib"] < 100, res  # the gallery is visited in blocks
    distmat_mib = 400 * 200_000 * 4 / 2**20  # 305 MiB: the [Q, N] float32 distances alone would not fit
    assert res["added_mib"] < min(1.5 * res["bound_mib"] + 16, distmat_mib), res
    assert res["mAP"] > 0  # it did evaluate


def test_evaluator_is_faster_than_argsort_of_the_same_matrix_and_reports_its_metrics(tmp_path):
    result, rows = run_bench(["--stages", "metrics", "--metrics-size", "1000", "8000", "250", "--threads", "1"],
                             tmp_path)
    # every sort-based evaluator takes at least one argsort of the matrix; ours ranks only the true matches
    # (measured 0.14-0.25 with one thread on 2 busy cores)
    ratio_1thread = next(r["value"] for r in rows if r["figure"] == "evaluate_rank / np.argsort")  # --threads 1
    assert ratio_1thread < 1, rows
    res = printed_metrics(result.stdout, "evaluate_rank")  # the metrics of the same 1000 x 8000 problem, 6 cameras
    q_feats, q_pids, q_camids, g_feats, g_pids, g_camids = synthetic_problem(1000, 8000, 250, 6)
    distmat = torch.cdist(q_feats.double(), g_feats.double()).square().float().numpy()
    ref = reference_rank(distmat, q_pids.numpy(), g_pids.numpy(), q_camids.numpy(), g_camids.numpy())
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-4) and res["R1"] == pytest.approx(ref["cmc"][0], abs=1e-3)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-4)


def test_cli_evaluates_a_checkpoint_both_ways(synthetic_root, tmp_path, capsys):
    model = pytest.importorskip("model")
    net = model.build_model("resnet18", num_classes=4)
    torch.save({"model": net.state_dict(), "model_name": "resnet18", "num_classes": 4, "last_stride": 1,
                "stem_relu": True}, tmp_path / "ckpt.pth")
    results = ev.evaluate_command(["--MODEL.PRETRAIN_PATH", str(tmp_path / "ckpt.pth"), "--DATASETS.NAMES",
                                   "synthetic", "--DATASETS.ROOT_DIR", synthetic_root, "--DATALOADER.NUM_WORKERS",
                                   "0", "--INPUT.SIZE_TEST", "64", "32", "--TEST.IMS_PER_BATCH", "16",
                                   "--visualize", str(tmp_path / "pictures")])
    out = capsys.readouterr().out
    assert "per image" in out and "centroid" in out and "mAP %" in out
    assert set(results) == {"image", "centroid"}
    pictures = sorted((tmp_path / "pictures").glob("*.png"))
    assert (tmp_path / "pictures" / "cmc.png") in pictures and len(pictures) > 1
    for picture in pictures:
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ev.main(["--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR", synthetic_root]) == 2
    assert "give MODEL.PRETRAIN_PATH (or TEST.WEIGHT)" in capsys.readouterr().err
    # one command prints the results with and without re-ranking
    reranked = ev.evaluate_command(["--MODEL.PRETRAIN_PATH", str(tmp_path / "ckpt.pth"), "--DATASETS.NAMES",
                                    "synthetic", "--DATASETS.ROOT_DIR", synthetic_root, "--DATALOADER.NUM_WORKERS",
                                    "0", "--INPUT.SIZE_TEST", "64", "32", "TEST.RERANK", "True", "TEST.RERANK_K1", "6"])
    out = capsys.readouterr().out
    assert "without re-ranking:" in out and "with k-reciprocal re-ranking (k1 6, k2 6, lambda 0.3):" in out
    assert out.count("per image") == 2 and f"{100 * results['image']['mAP']:7.2f}" in out
    assert set(reranked) == {"image", "centroid"}


def test_a_checkpoint_is_evaluated_with_the_normalisation_it_was_trained_with(synthetic_root, tmp_path, capsys):
    model = pytest.importorskip("model")
    net = model.build_model("resnet18", num_classes=4)
    saved = {"model": net.state_dict(), "model_name": "resnet18", "num_classes": 4, "last_stride": 1,
             "stem_relu": True}
    recorded = {"INPUT.PIXEL_MEAN": [0.2, 0.3, 0.4], "INPUT.PIXEL_STD": [0.5, 0.25, 0.5], "INPUT.SIZE_TEST": [64, 32]}
    torch.save({**saved, "config": recorded}, tmp_path / "recorded.pth")
    torch.save(saved, tmp_path / "plain.pth")  # weights only: nothing recorded
    common = ["--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR", synthetic_root, "--DATALOADER.NUM_WORKERS", "0",
              "--TEST.IMS_PER_BATCH", "16", "--MODEL.PRETRAIN_PATH"]
    from_checkpoint = ev.evaluate_command([*common, str(tmp_path / "recorded.pth")])
    assert "input size 64x32, normalisation mean 0.2 0.3 0.4 std 0.5 0.25 0.5" in capsys.readouterr().out
    given = ["--INPUT.SIZE_TEST", "64", "32", "--INPUT.PIXEL_MEAN", "0.2", "0.3", "0.4", "--INPUT.PIXEL_STD", "0.5",
             "0.25", "0.5"]
    by_hand = ev.evaluate_command([*common, str(tmp_path / "plain.pth"), *given])
    assert from_checkpoint["image"]["mAP"] == by_hand["image"]["mAP"]
    assert from_checkpoint["centroid"]["mAP"] == by_hand["centroid"]["mAP"]
    capsys.readouterr()
    ev.evaluate_command([*common, str(tmp_path / "recorded.pth"), "--INPUT.PIXEL_MEAN", "0.5", "0.5", "0.5"])
    assert "normalisation mean 0.5 0.5 0.5 std 0.5 0.25 0.5" in capsys.readouterr().out  # given beats recorded


def test_pixel_baseline_is_perfect_when_gallery_images_copy_the_queries(tmp_path, capsys):
    from PIL import Image
    colours = {1: (250, 0, 0), 2: (0, 250, 0), 3: (0, 0, 250)}
    for pid, colour in colours.items():
        for sub, name in (("bounding_box_train", "c1s1_000001"), ("query", "c1s1_000002"),
                          ("bounding_box_test", "c2s1_000003")):
            path = tmp_path / "synthetic" / sub / f"{pid:04d}_{name}_00.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), colour).save(path)
    assert ev.pixel_baseline_map(str(tmp_path)) == pytest.approx(1.0)
    assert ev.main(["baseline", str(tmp_path)]) == 0
    assert ev.main(["baseline", str(tmp_path / "nowhere")]) == 2  # a bad root: the message and exit code 2
    assert "raw-pixel nearest-neighbour mAP: 100.0%" in capsys.readouterr().out



@pytest.mark.parametrize("decoder", ["host", "device"])
def test_an_unreadable_file_is_left_out_of_the_evaluation_or_stops_it_as_the_policy_says(synthetic_root, tmp_path,
                                                                                        decoder):
    import shutil

    from data import read_dataset
    from support import config
    from support.image_check import SKIPPED, without_paths
    from support.utils import DataError
    root = str(tmp_path / "data")
    shutil.copytree(synthetic_root, root)
    data = read_dataset("synthetic", root)
    broken = data["gallery"][3][0]
    with open(broken, "wb") as f:
        f.write(b"not an image\n")
    cfg, _, _ = config.parse(["INPUT.SIZE_TEST", "[32, 16]", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR",
                              str(tmp_path / "out"), "INPUT.DEVICE_AUGMENT", str(decoder == "device")])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten(), torch.nn.Linear(24, 6))
    with pytest.raises(DataError, match=f"^cannot read image {broken} .*or set --DATALOADER.SKIP_BAD true"):
        ev.evaluate_splits(model, dict(data), cfg, torch.device("cpu"))
    skipping = cfg.replace({"DATALOADER.SKIP_BAD": True})
    left_out = dict(data)
    results, (_, g_feats) = ev.evaluate_splits(model, left_out, skipping, torch.device("cpu"))
    without = without_paths(data, [broken])
    expected, _ = ev.evaluate_splits(model, dict(without), skipping, torch.device("cpu"))
    assert left_out["gallery"] == without["gallery"] and len(g_feats) == len(data["gallery"]) - 1
    for kind in ("image", "centroid"):
        assert results[kind]["mAP"] == pytest.approx(expected[kind]["mAP"], abs=1e-6)
    assert (tmp_path / "out" / SKIPPED).read_text().split("\t")[0] == broken
