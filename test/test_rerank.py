"""support/rerank.py: k-reciprocal re-ranking against a slow reference written from the paper's equations, its symmetry,
its effect on retrieval, the re-ranked evaluation and its argument checks."""
import math

import pytest
import torch

from support import centroids, rerank
from support.centroids import EvaluationOptions
from support.metrics import Split, evaluate_rank
from support.synthetic import synthetic_problem


def reference_rerank(q_feats, g_feats, k1, k2, lambda_value):
    """Zhong et al. (CVPR 2017), eq. 1-12, one item at a time with Python sets, in float64."""
    feats = torch.cat([q_feats, g_feats]).double()
    num, num_query = len(feats), len(q_feats)
    dist = torch.cdist(feats, feats).square()
    dist = dist / dist.max(dim=1, keepdim=True).values  # d: squared distance over its row's largest (authors' code)
    ranking = [torch.argsort(dist[i], stable=True).tolist() for i in range(num)]

    def nearest(i, k):  # N(i, k): i itself and its k nearest items
        return ranking[i][:k + 1]

    def reciprocal(i, k):  # R(i, k), eq. 4
        return {j for j in nearest(i, k) if i in nearest(j, k)}

    V = torch.zeros(num, num, dtype=torch.float64)
    for i in range(num):
        base = reciprocal(i, k1)
        expanded = set(base)
        for j in base:  # eq. 6: the 1/2-expansion
            half = reciprocal(j, round(k1 / 2))
            if len(half & base) > 2 / 3 * len(half):
                expanded |= half
        weights = {j: math.exp(-dist[i, j].item()) for j in expanded}  # eq. 7
        for j, w in weights.items():
            V[i, j] = w / sum(weights.values())
    V = torch.stack([V[ranking[i][:k2]].mean(0) for i in range(num)])  # eq. 10: local query expansion
    jaccard = torch.zeros(num_query, num - num_query, dtype=torch.float64)
    for i in range(num_query):  # eq. 11
        for j in range(num - num_query):
            g = num_query + j
            jaccard[i, j] = 1 - torch.minimum(V[i], V[g]).sum() / torch.maximum(V[i], V[g]).sum()
    return (1 - lambda_value) * jaccard + lambda_value * dist[:num_query, num_query:]  # eq. 12


def clustered(num_query, num_gallery, num_ids, dim, seed):
    """Market-like features: identities, cameras, noise, distractors (synthetic.synthetic_problem)."""
    q, _, _, g, _, _ = synthetic_problem(num_query, num_gallery, num_ids, 3, dim=dim, seed=seed)
    return q, g


@pytest.mark.parametrize("num_query,num_gallery,k1,k2,lambda_value,kind", [
    (30, 120, 20, 6, 0.3, "clustered"),
    (25, 90, 8, 3, 0.5, "clustered"),
    (40, 60, 5, 1, 0.0, "random"),     # odd k1 (round(2.5) = 2), no query expansion, Jaccard only
    (7, 9, 20, 6, 0.3, "random"),      # fewer items than k1 + 1: every list is truncated
    (12, 70, 10, 12, 1.0, "clustered"),  # k2 > k1 + 1, lambda 1: the scaled distance only
])
def test_matches_the_reference_built_from_the_papers_equations(num_query, num_gallery, k1, k2, lambda_value, kind,
                                                              monkeypatch):
    monkeypatch.setattr(rerank, "BLOCK_ROWS", 16)  # several blocks, each pair of blocks once
    monkeypatch.setattr(rerank, "MAX_PAIRS", 64)   # many Jaccard chunks
    if kind == "random":
        gen = torch.Generator().manual_seed(num_query)
        q, g = torch.randn(num_query, 16, generator=gen), torch.randn(num_gallery, 16, generator=gen)
    else:
        q, g = clustered(num_query, num_gallery, 12, 32, seed=num_gallery)
    ours = rerank.rerank_distances(q, g, k1, k2, lambda_value)
    assert ours.shape == (num_query, num_gallery) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_rerank(q, g, k1, k2, lambda_value), atol=2e-6, rtol=0)


def test_jaccard_part_is_symmetric_in_probe_and_gallery_and_order_free():
    q, g = clustered(30, 100, 10, 32, seed=3)
    forward = rerank.rerank_distances(q, g, lambda_value=0.0)
    backward = rerank.rerank_distances(g, q, lambda_value=0.0)  # the same pooled items, roles swapped
    torch.testing.assert_close(forward, backward.T, atol=1e-6, rtol=0)
    perm = torch.randperm(len(g), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rerank.rerank_distances(q, g[perm]), rerank.rerank_distances(q, g)[:, perm],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("keep_camid_centroids", [True, False])
def test_lambda_one_keeps_every_ranking_of_the_evaluation(keep_camid_centroids):
    # few gallery images per identity: other-cameras centroids differ from the identity's, some are missing
    q, q_pids, q_cams, g, g_pids, g_cams = synthetic_problem(120, 120, 30, 4, dim=64, noise=1.3, seed=1)
    gen = torch.Generator().manual_seed(0)
    q, g = q * (1 + torch.rand(len(q), 1, generator=gen)), g * (1 + torch.rand(len(g), 1, generator=gen))  # raw
    args = (Split(q, q_pids, q_cams), Split(g, g_pids, g_cams))
    common = {"keep_camid_centroids": keep_camid_centroids, "centroid_protocol": "all"}
    plain = centroids.evaluate_features(*args, EvaluationOptions(**common), raw_feats=True)
    # lambda 1: d scaled per query, the same rankings
    same = centroids.evaluate_reranked(*args, EvaluationOptions(rerank=(20, 6, 1.0), **common), raw_feats=True)
    assert set(same) == set(plain) == {"image", "centroid", "centroid_original", "centroid_original_fixed"}
    for kind in plain:
        assert same[kind]["mAP"] == pytest.approx(plain[kind]["mAP"], abs=1e-9), kind
        assert (same[kind]["cmc"] == plain[kind]["cmc"]).all(), kind
        assert same[kind]["num_valid_queries"] == plain[kind]["num_valid_queries"], kind
        assert same[kind].get("protocol") == plain[kind].get("protocol")


def test_reranking_helps_per_image_on_noisy_features():
    q, q_pids, q_cams, g, g_pids, g_cams = synthetic_problem(120, 600, 30, 6, dim=64, noise=1.3, seed=1)
    query, gallery = Split(q, q_pids, q_cams), Split(g, g_pids, g_cams)
    plain = evaluate_rank(torch.cdist(q, g), query, gallery)
    reranked = centroids.evaluate_reranked(query, gallery)
    assert reranked["image"]["mAP"] > plain["mAP"] + 0.1  # measured 0.77 -> 0.99 mAP on this problem
    assert reranked["image"]["cmc"][0] >= plain["cmc"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_distances_on_the_gpu():
    q, g = clustered(200, 900, 40, 64, seed=5)
    on_gpu = rerank.rerank_distances(q.cuda(), g.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), rerank.rerank_distances(q, g), atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(3, 4), torch.zeros(5, 6)), r"\[Q, D\] and \[G, D\]"),
    ((torch.zeros(0, 4), torch.zeros(5, 4)), "at least one query"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), 0), "k1=0"),
    ((torch.zeros(3, 4), torch.zeros(5, 4), 20, 6, 1.5), "lambda_value=1.5"),
])
def test_bad_arguments_are_named(args, message):
    with pytest.raises(rerank.RerankError, match=message):
        rerank.rerank_distances(*args)


def test_identical_items_give_finite_distances():
    out = rerank.rerank_distances(torch.ones(4, 8), torch.ones(6, 8))
    assert torch.isfinite(out).all()
