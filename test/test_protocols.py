"""The three centroid evaluation protocols (centroids.evaluate_centroids' centroid_protocol) against slow
per-query loops written from each rule's words, on hand-built galleries where the rules disagree and on
random problems."""
import numpy as np
import pytest
import torch
from bench_runs import printed_metrics, run_bench

import evaluate as ev
from support import centroids, metrics
from support.centroids import CENTROID_PROTOCOLS, EvaluationOptions
from support.metrics import Split

# ---------------------------------------------------------------------------------------------------
# Loop references: one query at a time, the rule's words in plain Python, float64

def rank_summary(per_query_galleries, q_feats, q_pids):
    """Given, per query, its kept gallery as (feats list, pids list): (mAP, R1, number of skipped queries)."""
    aps, firsts, skipped = [], [], 0
    for i, (feats, pids) in enumerate(per_query_galleries):
        dist = ((np.array(feats).reshape(len(feats), -1) - q_feats[i]) ** 2).sum(1)
        hits = np.array(pids)[np.argsort(dist, kind="stable")] == q_pids[i]
        if not hits.any():
            skipped += 1
            continue
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        firsts.append(ranks[0])
    return np.mean(aps), np.mean(np.array(firsts) == 1), skipped


def unit_rows(x):
    """Rows divided by their L2 norm (float64)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_standard(q, q_pids, q_camids, g, g_pids, g_camids, camera_aware=True, normalize=True):
    """Per query (pid p, camera c): p's centroid from p's gallery images of cameras != c; every other
    identity's centroid from all its gallery images; each distractor (pid 0) image on its own."""
    galleries = []
    for i in range(len(q)):
        feats, pids = [], []
        for pid in sorted(set(g_pids.tolist())):
            if pid == 0:
                for j in np.flatnonzero(g_pids == 0):  # the per-image rule: same pid and camera removed
                    if not (camera_aware and q_pids[i] == 0 and g_camids[j] == q_camids[i]):
                        feats.append(g[j])
                        pids.append(0)
                continue
            use = g_pids == pid
            if camera_aware and pid == q_pids[i]:
                use &= g_camids != q_camids[i]
            if use.any():
                centroid = g[use].mean(0)
                feats.append(centroid / np.linalg.norm(centroid) if normalize else centroid)
                pids.append(pid)
        galleries.append((feats, pids))
    return rank_summary(galleries, q, q_pids)


def loop_original(q, q_pids, q_camids, g, g_pids, g_camids, camera_aware=True, index_bug=True, normalize=True):
    """centroids-reid a1825b7's validation_create_centroids + R1_mAP.compute + eval_func, as loops."""
    camids = np.concatenate([q_camids, g_camids])  # its `camids`: queries first, then the gallery
    centroids, c_pids, c_sets = [], [], []
    for label in sorted(set(g_pids.tolist())):
        inds = np.flatnonzero(g_pids == label)
        if not camera_aware:
            centroids.append(g[inds].mean(0))
            c_pids.append(label)
            c_sets.append(())
            continue
        cams_of_inds = camids[inds] if index_bug else g_camids[inds]  # the bug: gallery offsets, query-first list
        seen = set()
        for cam in sorted(set(q_camids[q_pids == label].tolist())):
            use = cams_of_inds != cam
            if not use.any():
                continue
            used = tuple(sorted(set(cams_of_inds[use].tolist())))
            if used in seen:
                continue
            seen.add(used)
            centroids.append(g[inds][use].mean(0))
            c_pids.append(label)
            c_sets.append(used)
    centroids = np.array(centroids)
    if normalize:
        q, centroids = unit_rows(q), unit_rows(centroids)
    galleries = []
    for i in range(len(q)):
        keep = [k for k in range(len(centroids)) if not (c_pids[k] == q_pids[i] and q_camids[i] in c_sets[k])]
        galleries.append(([centroids[k] for k in keep], [c_pids[k] for k in keep]))
    return rank_summary(galleries, q, q_pids)


def loop_reference(protocol, *problem, camera_aware=True, normalize=True):
    """The loop reference of a protocol name on numpy float64 inputs."""
    if protocol == "standard":
        return loop_standard(*problem, camera_aware=camera_aware, normalize=normalize)
    return loop_original(*problem, camera_aware=camera_aware, index_bug=protocol == "original", normalize=normalize)


def as_numpy(problem):
    """(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids) with float64 feats, all numpy."""
    return tuple(x.double().numpy() if torch.is_tensor(x) and x.is_floating_point() else np.asarray(x)
                 for x in problem)


def splits(problem):
    """(query, gallery) Splits of (q_feats, q_pids, q_camids, g_feats, g_pids, g_camids)."""
    return Split(*problem[:3]), Split(*problem[3:])


def ours(protocol, problem, raw_feats=False, **options):
    """evaluate_centroids on (q_feats, q_pids, q_camids, g_feats, g_pids, g_camids), options as EvaluationOptions'."""
    return centroids.evaluate_centroids(*splits(problem), EvaluationOptions(centroid_protocol=protocol, **options),
                                        raw_feats)


def features(problem, raw_feats=False, **options):
    """evaluate_features on (q_feats, q_pids, q_camids, g_feats, g_pids, g_camids), options as EvaluationOptions'."""
    return centroids.evaluate_features(*splits(problem), EvaluationOptions(**options), raw_feats)


# ---------------------------------------------------------------------------------------------------
# A hand-built gallery on which the three rules give three answers

def unit(*rows):
    """Rows as a float32 tensor of unit vectors."""
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def three_rules_gallery():
    """q0 (pid 1, camera 0) and q1 (pid 2, camera 1). Gallery item j's camera under the original's bug is
    item j of [query cameras, gallery cameras] = [0, 1, 1, 2, 0, 0]."""
    q_feats = unit([1, 0, 0], [0, 1, 0])
    g_feats = unit([0.6, 0, 0.8],    # g0 pid 1, camera 1 (bug: 0)
                   [0.2, 0, 0.98],   # g1 pid 1, camera 2 (bug: 1)
                   [0.8, 0.6, 0],    # g2 pid 2, camera 0 (bug: 1)
                   [0, 1, 0],        # g3 pid 2, camera 2 (bug: 2)
                   [0.9, 0, 0.436])  # g4 pid 3, camera 0: no query asks for pid 3; close to q0, same camera
    return q_feats, np.array([1, 2]), np.array([0, 1]), g_feats, np.array([1, 1, 2, 2, 3]), np.array([1, 2, 0, 2, 0])


def test_three_rules_give_three_answers_each_equal_to_its_loop_reference():
    problem = three_rules_gallery()
    results = {p: ours(p, problem, max_rank=3) for p in CENTROID_PROTOCOLS}
    for protocol, res in results.items():
        m_ap, r1, skipped = loop_reference(protocol, *as_numpy(problem))
        assert res["protocol"] == protocol
        assert res["mAP"] == pytest.approx(m_ap, abs=1e-6) and res["cmc"][0] == pytest.approx(r1)
        assert res["num_skipped_queries"] == skipped == 0
    # standard: q0's centroid is (g0 + g1) / 2; pid 2's centroid keeps its camera-0 image g2, and pid 3's
    # (g4, from q0's own camera, the negative only this rule keeps) ranks first: q0's match is 3rd.
    # q1's centroid (g2 + g3) / 2 is nearest to it. mAP (1/3 + 1) / 2.
    assert results["standard"]["mAP"] == pytest.approx((1 / 3 + 1) / 2)
    # original_fixed: pid 3 has no query, so no centroid; q0's match ranks 2nd behind pid 2's (g2 + g3) / 2.
    assert results["original_fixed"]["mAP"] == pytest.approx((1 / 2 + 1) / 2)
    # original: the shifted cameras build q0's centroid from g1 alone and q1's from g3 alone: both rank first.
    assert results["original"]["mAP"] == pytest.approx(1.0)


def test_the_old_per_camera_rule_is_gone():
    problem = three_rules_gallery()
    # the old rule (kept only as the benchmark's baseline) built EVERY identity's centroid without the
    # query's camera: pid 3 (camera 0 only) vanished for q0, and pid 2 lost g2, so q0's match was first.
    old = centroids.old_per_camera_centroids(*splits(problem), max_rank=3)
    assert old["mAP"] == pytest.approx(1.0)
    assert ours("standard", problem, max_rank=3)["mAP"] == pytest.approx((1 / 3 + 1) / 2)


def test_a_query_without_other_camera_images_of_its_identity_is_skipped():
    q_feats = unit([1, 0], [0, 1])
    g_feats = unit([1, 0.1], [0.1, 1], [0.5, 0.5])
    # q0 (pid 1, camera 0): pid 1's only gallery image is from camera 0, so no true match: skipped, counted.
    # It stays a negative (from all its images) for q1 (pid 2, camera 0), whose match is from camera 1.
    problem = (q_feats, np.array([1, 2]), np.array([0, 0]), g_feats, np.array([1, 2, 0]), np.array([0, 1, 1]))
    res = ours("standard", problem)
    assert res["num_skipped_queries"] == 1 and res["num_valid_queries"] == 1
    assert res["mAP"] == pytest.approx(1.0)
    assert ours("standard", problem, keep_camid_centroids=False)["num_skipped_queries"] == 0


def test_original_drops_unqueried_identities_and_averages_distractors_without_cameras():
    q_feats = unit([1, 0, 0])
    g_feats = unit([0.5, 0.866, 0],   # pid 1 (the query's), camera 1
                   [0.9, 0.436, 0],   # distractor, camera 0
                   [0.9, -0.436, 0],  # distractor, camera 2: averaged with the first, [1, 0, 0]
                   [0.8, 0, 0.6])     # pid 9, which no query asks for
    problem = (q_feats, np.array([1]), np.array([0]), g_feats, np.array([1, 0, 0, 9]), np.array([1, 0, 2, 1]))
    # standard: both distractors (single items) and pid 9 rank before the match
    assert ours("standard", problem, max_rank=4)["mAP"] == pytest.approx(1 / 4)
    # original with cameras: only queried labels get centroids: the match is alone
    assert ours("original_fixed", problem)["mAP"] == pytest.approx(1.0)
    # original without cameras: every label one centroid, pid 0 averaged into one (exactly q's direction)
    flat = ours("original_fixed", problem, keep_camid_centroids=False, max_rank=3)
    assert flat["mAP"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(flat["cmc"], [0, 0, 1])


# ---------------------------------------------------------------------------------------------------
# Random problems

def random_problem(seed, num_gallery=200, num_query=60, num_ids=15, num_cams=4, dim=16, raw=False):
    """Distractors (pid 0), identities seen by one camera only, query pids missing from the gallery."""
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    g_camids = torch.randint(0, num_cams, (num_gallery,), generator=gen)
    g_camids[g_pids % 5 == 1] = 2                       # these identities have camera 2 only
    q_pids = torch.randint(1, num_ids + 3, (num_query,), generator=gen)  # the last 3: not in the gallery
    q_camids = torch.randint(0, num_cams, (num_query,), generator=gen)
    centres = torch.randn(num_ids + 3, dim, generator=gen)
    cam_bias = 0.5 * torch.randn(num_cams, dim, generator=gen)
    g_feats = centres[g_pids] + cam_bias[g_camids] + 1.5 * torch.randn(num_gallery, dim, generator=gen)
    q_feats = centres[q_pids] + cam_bias[q_camids] + 1.5 * torch.randn(num_query, dim, generator=gen)
    if raw:  # embeddings of very different norms, as a BN output before normalisation
        g_feats *= torch.empty(num_gallery, 1).uniform_(0.2, 5, generator=gen)
        q_feats *= torch.empty(num_query, 1).uniform_(0.2, 5, generator=gen)
    else:
        g_feats, q_feats = metrics.l2_normalize(g_feats), metrics.l2_normalize(q_feats)
    return q_feats, q_pids.numpy(), q_camids.numpy(), g_feats, g_pids.numpy(), g_camids.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("protocol", CENTROID_PROTOCOLS)
def test_random_problems_match_the_loop_reference(protocol, seed):
    problem = random_problem(seed)
    # small chunks: several query chunks and gallery blocks, as on a large problem
    res = ours(protocol, problem, chunk_bytes=metrics.BYTES_PER_ITEM * 64 * 7)
    m_ap, r1, skipped = loop_reference(protocol, *as_numpy(problem))
    assert 0.1 < m_ap < 0.99 and skipped > 0  # neither trivial nor hopeless, and some queries skipped
    assert res["mAP"] == pytest.approx(m_ap, abs=1e-6)
    assert res["cmc"][0] == pytest.approx(r1, abs=1e-9)
    assert res["num_skipped_queries"] == skipped


@pytest.mark.parametrize("protocol", CENTROID_PROTOCOLS)
def test_without_cameras_each_protocol_matches_its_loop_reference(protocol):
    problem = random_problem(4)
    m_ap, r1, skipped = loop_reference(protocol, *as_numpy(problem), camera_aware=False)
    for kwargs in ({"keep_camid_centroids": False}, {"camera_agnostic": True}):
        res = ours(protocol, problem, **kwargs)
        assert res["mAP"] == pytest.approx(m_ap, abs=1e-6) and res["cmc"][0] == pytest.approx(r1, abs=1e-9)
        assert res["num_skipped_queries"] == skipped


def test_original_averages_raw_embeddings_then_normalises():
    raw = random_problem(5, raw=True)
    numpy_raw = as_numpy(raw)
    for protocol in ("original", "original_fixed"):
        res = ours(protocol, raw, raw_feats=True)
        m_ap, r1, skipped = loop_reference(protocol, *numpy_raw)
        assert res["mAP"] == pytest.approx(m_ap, abs=1e-6) and res["cmc"][0] == pytest.approx(r1, abs=1e-9)
        assert res["num_skipped_queries"] == skipped
        # averaging the normalised embeddings instead gives another answer: the contract matters
        normalised = (unit_rows(numpy_raw[0]), *numpy_raw[1:3], unit_rows(numpy_raw[3]), *numpy_raw[4:])
        assert abs(loop_reference(protocol, *normalised)[0] - m_ap) > 1e-4
    # feat norm off: no normalisation anywhere, the means of the raw embeddings
    res = ours("original", raw, raw_feats=True, normalize_centroids=False)
    assert res["mAP"] == pytest.approx(loop_reference("original", *numpy_raw, normalize=False)[0], abs=1e-6)


def test_raw_features_give_the_normalised_per_image_and_standard_rows():
    raw = random_problem(6, raw=True)
    unit_problem = (metrics.l2_normalize(raw[0]), *raw[1:3], metrics.l2_normalize(raw[3]), *raw[4:])
    from_raw = features(raw, centroid_protocol="all", raw_feats=True)
    from_unit = features(unit_problem, centroid_protocol="all")
    for key in ("image", "centroid"):
        assert from_raw[key]["mAP"] == pytest.approx(from_unit[key]["mAP"], abs=1e-9)
    assert from_raw["centroid_original"]["mAP"] == pytest.approx(
        loop_reference("original", *as_numpy(raw))[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# evaluate_features(centroid_protocol="all") and the table

def test_all_protocols_give_one_row_each_and_the_table_names_them():
    problem = random_problem(7)
    results = features(problem, centroid_protocol="all", max_rank=10)
    assert list(results) == ["image", "centroid", "centroid_original", "centroid_original_fixed"]
    assert [results[k]["protocol"] for k in list(results)[1:]] == list(CENTROID_PROTOCOLS)
    for protocol, key in zip(CENTROID_PROTOCOLS, list(results)[1:]):  # each row is that protocol's result
        assert results[key]["mAP"] == ours(protocol, problem)["mAP"]
    lines = ev.format_results(results).splitlines()
    assert lines[1].startswith("per image")
    assert [line.split()[1] for line in lines[2:5]] == list(CENTROID_PROTOCOLS)
    assert f"{100 * results['centroid_original']['mAP']:.2f}" in lines[3]
    assert lines[5].startswith("centroid protocols:") and all(p in lines[5] for p in CENTROID_PROTOCOLS)
    single = features(problem, centroid_protocol="original")
    assert set(single) == {"image", "centroid"} and single["centroid"]["protocol"] == "original"
    lines = ev.format_results(single).splitlines()
    assert lines[2].startswith("centroid ") and lines[3].startswith("centroid protocol: original =")


def test_an_unknown_protocol_is_named_with_the_choices():
    problem = random_problem(8)
    with pytest.raises(metrics.EvaluationError, match="'market'.*standard, original, original_fixed"):
        features(problem, centroid_protocol="market")
    with pytest.raises(metrics.EvaluationError, match="'all'"):
        ours("all", problem)  # "all" is for evaluate_features, which makes one row per protocol


def test_centroid_benchmark_times_every_evaluation_on_one_problem(tmp_path):
    result, rows = run_bench(["--stages", "centroids", "--metrics-size", "100", "600", "40", "--centroid-dim", "32",
                              "--centroid-rounds", "1"], tmp_path)
    names = ["per image", "centroids, old per-camera rule, baseline", *(f"centroids, {p}" for p in CENTROID_PROTOCOLS)]
    assert [row["figure"] for row in rows[:-1]] == [f"{name} (40 ids, 6 cams, 32-d)" for name in names]
    for name, row in zip(names, rows):
        assert row["value"] > 0 and 0 < printed_metrics(result.stdout, name)["mAP"] <= 1
    assert rows[-1]["figure"] == "centroids standard / old per-camera rule"
    assert rows[-1]["value"] == pytest.approx(rows[2]["value"] / rows[1]["value"])
