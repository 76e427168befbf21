"""evaluate.py: exact metrics (hand-made and against a slow reference), edge cases, centroids, features."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402


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
    res = ev.evaluate_rank(distmat, np.array([1, 2]), g_pids, np.array([0, 0]), g_camids, max_rank=5)
    ap0 = (1 / 2 + 2 / 4) / 2                               # precisions at the hits
    trap0 = ((0 / 1 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2  # Market-1501 official trapezoid
    assert res["mAP"] == pytest.approx((ap0 + 1) / 2)
    assert res["mAP_trapezoid"] == pytest.approx((trap0 + 1) / 2)
    assert res["mAP_trapezoid"] < res["mAP"]
    assert res["mINP"] == pytest.approx((2 / 4 + 1) / 2)
    np.testing.assert_allclose(res["cmc"], [0.5, 1, 1, 1, 1])
    assert res["num_valid_queries"] == 2 and res["num_skipped_queries"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_slow_reference(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng)
    ref = reference_rank(*problem, max_rank=20)
    assert 0 < ref["num_skipped_queries"] < len(problem[1])  # the problem exercises skipping
    for chunk_bytes in (1, 10_000, ev.CHUNK_BYTES):         # 1 query per chunk .. all at once
        assert_same(ev.evaluate_rank(*problem, max_rank=20, chunk_bytes=chunk_bytes), ref)
    assert_same(ev.evaluate_rank(*problem, max_rank=20, camera_agnostic=True),
                reference_rank(*problem, max_rank=20, camera_agnostic=True))


def test_torch_inputs_and_float64_compare_as_float32():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(np.random.default_rng(7))
    ref = reference_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    tensors = [torch.from_numpy(x) for x in (distmat, q_pids, g_pids, q_camids, g_camids)]
    assert_same(ev.evaluate_rank(*tensors), ref)
    assert_same(ev.evaluate_rank(distmat.astype(np.float64), q_pids, g_pids, q_camids, g_camids), ref)


def test_skipped_queries_are_counted_not_scored():
    # query 1's only match is in its own camera: skipped; query 0 is perfect
    distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=np.float32)
    res = ev.evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 1]), np.array([1, 1, 1]))
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 1
    assert res["mAP"] == 1.0 and res["cmc"][0] == 1.0


def test_no_valid_query_says_why_and_what_to_do():
    distmat = np.random.default_rng(0).random((4, 10)).astype(np.float32)
    pids = np.arange(10) % 4
    with pytest.raises(ev.EvaluationError) as info:
        ev.evaluate_rank(distmat, np.arange(4), pids, np.zeros(4, int), np.zeros(10, int))
    message = str(info.value)
    assert "single-camera" in message and "camera_agnostic=True" in message
    assert "--TEST.CAMERA_AGNOSTIC true" in message
    res = ev.evaluate_rank(distmat, np.arange(4), pids, np.zeros(4, int), np.zeros(10, int), camera_agnostic=True)
    assert res["num_valid_queries"] == 4
    with pytest.raises(ev.EvaluationError, match="no query identity appears in the gallery"):
        ev.evaluate_rank(distmat, np.arange(4) + 100, pids, np.zeros(4, int), np.ones(10, int))


def test_short_gallery_gives_a_monotone_cmc():
    # 3 gallery items, max_rank 50 (torchreid/fast-reid crash or return a non-monotone CMC here)
    distmat = np.array([[0.3, 0.1, 0.2], [0.1, 0.2, 0.3]], dtype=np.float32)
    args = (np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]))
    res = ev.evaluate_rank(distmat, *args, max_rank=50)
    assert len(res["cmc"]) == 50 and np.all(np.diff(res["cmc"]) >= 0)
    np.testing.assert_allclose(res["cmc"][:3], [0.0, 0.5, 1.0])  # query 0's hit at rank 3, query 1's at 2
    assert res["cmc"][-1] == 1.0
    assert_same(res, reference_rank(distmat, *args, max_rank=50))


def test_bad_inputs_raise_clear_errors():
    distmat = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ev.EvaluationError, match="g_pids has 2 entries"):
        ev.evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), np.array([1, 1, 1]))
    distmat[0, 1] = np.nan
    with pytest.raises(ev.EvaluationError, match="NaN"):
        ev.evaluate_rank(distmat, np.array([1, 2]), np.array([1, 2, 3]), np.array([0, 0]), np.array([1, 1, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_results_on_cuda():
    problem = random_problem(np.random.default_rng(3))
    cuda = [torch.as_tensor(x).cuda() for x in problem]
    assert_same(ev.evaluate_rank(*cuda), reference_rank(*problem))
