"""Retrieval evaluation: mAP, CMC and mINP per image and per identity centroid; checkpoint evaluation CLI.

    python evaluate.py --MODEL.PRETRAIN_PATH output/best.pth --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data
    python evaluate.py baseline data/synthetic    # raw-pixel nearest-neighbour mAP

Protocol (Market-1501, as torchreid and fast-reid): for each query, gallery items with the same pid and
the same camera are removed; a query left without a true match is skipped and counted. Gallery items
are ranked by distance, ties by gallery index (what a stable argsort gives); distances are compared as
float32, like the peers' Cython evaluators. No row is sorted: only the ranks of each query's true
matches are needed, and they come from a histogram of where every gallery item falls among the
query's (few, sorted) true-match distances.
"""
import argparse
import concurrent.futures
import contextlib
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import config
import utils
from data import build_datasets, build_test_loader, item_labels, load_image, read_dataset
from device_data import device_test_batches
from model import model_from_checkpoint
from report import Evaluator, write_config_report
from rerank import rerank_distances
from specs import embed_spec
from utils import DataError
from visualize import visualize_evaluation

CHUNK_BYTES = 32 * 2**20  # temporaries per chunk (and worker); small chunks stay in cache, reuse the heap
BYTES_PER_ITEM = 16       # per (query, gallery item) of a chunk: at most 16 B live at once (distance and
                          # sign fix, int64 key, int32 position)
MIN_ROWS = 64             # below this many queries per chunk the gallery is split into blocks instead
GALLERY_BYTES_PER_ITEM = 48  # once per call: the gallery sorted by pid (+ sort buffers), squared norms
INT64_MAX = torch.iinfo(torch.int64).max


class EvaluationError(utils.UserError, ValueError):
    """Bad evaluation input (shapes, NaN distances, no valid query); the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------------------------------
# Ranks of the true matches, one chunk of queries at a time

def _as_tensor(x, device, dtype=None):
    """numpy array / list / tensor -> tensor on device (no copy when it already is one)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.to(device=device, dtype=dtype or x.dtype)


def _order_keys(dist, index):
    """Distances [..., n] and their gallery indices [n] -> int64 keys ordered like (float32 distance, index)."""
    dist = dist.float()
    # one host read serves both checks below; min propagates NaN: no separate isnan().any() pass
    lowest = float(dist.min()) if dist.numel() else 0.0
    if math.isnan(lowest):
        raise EvaluationError("the distance matrix holds NaN: check the embeddings (a diverged model?)")
    bits = dist.view(torch.int32)  # for floats >= +0.0 the bit patterns order like the values
    if lowest <= 0:  # negative floats (and -0.0) order backwards as integers: flip them, in place
        bits = bits.clone()
        sign = bits >> 31  # -1 or 0
        bits ^= sign & 0x7FFFFFFF
        bits -= sign  # and -0.0 -> 0, the key of +0.0: the two tie, as in numpy
        del sign
    keys = bits.to(torch.int64)
    keys <<= 32  # the distance in the high 32 bits, the gallery index in the low 32 (no promotion temporaries)
    keys |= index
    return keys


def gallery_by_pid(g_pids):
    """(gallery indices sorted by pid, stably; the sorted pids): finds each query's same-pid items."""
    g_pids = torch.as_tensor(g_pids)
    order = torch.argsort(g_pids, stable=True)
    return order, g_pids[order]


def _same_pid_pairs(q_pids, by_pid):
    """(rows, cols) of all (query, gallery item) pairs with the same pid, row-major, without a [Q, N] mask."""
    order, sorted_pids = by_pid
    q_pids = q_pids.contiguous()  # a column slice of a chunk: searchsorted wants its values contiguous
    starts = torch.searchsorted(sorted_pids, q_pids)                               # [Q]
    counts = torch.searchsorted(sorted_pids, q_pids, right=True) - starts         # [Q]
    rows = torch.repeat_interleave(torch.arange(len(q_pids), device=q_pids.device), counts)
    offsets = torch.arange(len(rows), device=q_pids.device) - (torch.cumsum(counts, 0) - counts)[rows]
    return rows, order[starts[rows] + offsets]


def rank_true_matches(source, start, stop, num_gallery, q_pids, q_camids, g_camids, by_pid,
                      camera_agnostic=False, block=None, camera_sets=False):
    """1-based ranks of the true matches of queries start..stop among their kept gallery items.

    source = (block_distances(a, b, c0, c1) -> [b-a, c1-c0], pair_distances(rows, cols) -> [T]);
    q_pids/q_camids [stop-start], g_camids [N] int64 on the source's device; by_pid = gallery_by_pid(g_pids).
    A same-pid item is a true match when its camera differs from the query's, and removed otherwise;
    with camera_sets, q_camids are camera bits and g_camids camera-set bit masks, and it is a true match
    when the query's camera is not in the item's set (the original's centroids, see evaluate_centroids).
    The gallery is visited in blocks of `block` items, so memory does not grow with it. Returns
    (ranks [Q, M] int64, ascending per row, valid in the first num_matches[q] columns; num_matches [Q]).
    """
    block_distances, pair_distances = source
    num_query, device = stop - start, q_pids.device
    rows, cols = _same_pid_pairs(q_pids, by_pid)                                   # few pairs per query
    if camera_agnostic:
        is_match = torch.ones_like(rows, dtype=torch.bool)
    elif camera_sets:
        is_match = (g_camids[cols] & q_camids[rows]) == 0
    else:
        is_match = g_camids[cols] != q_camids[rows]
    match_rows, match_cols = rows[is_match], cols[is_match]                        # row-major still
    num_matches = torch.bincount(match_rows, minlength=num_query)                  # [Q]
    width = max(int(num_matches.max()), 1) if num_query else 1
    slots = torch.arange(len(match_rows), device=device) - (torch.cumsum(num_matches, 0) - num_matches)[match_rows]
    match_keys = torch.full((num_query, width), INT64_MAX, dtype=torch.int64, device=device)
    match_keys[match_rows, slots] = _order_keys(pair_distances(match_rows + start, match_cols), match_cols)
    match_keys = match_keys.sort(1).values                                         # [Q, M], pads last
    # counts[q, j] = how many of q's other-identity items fall between its true matches j-1 and j;
    # summed, plus the j matches themselves, that is the rank of match j. Same-identity items are left
    # out of the counts: the matches are counted by their sorted order, the rest are removed.
    counts = torch.zeros(num_query * (width + 1), dtype=torch.int64, device=device)
    row_offsets = torch.arange(num_query, device=device, dtype=torch.int32)[:, None] * (width + 1)
    block = block or num_gallery
    for c0 in range(0, num_gallery, block):
        c1 = min(c0 + block, num_gallery)
        keys = _order_keys(block_distances(start, stop, c0, c1), torch.arange(c0, c1, device=device))
        inside = (cols >= c0) & (cols < c1)
        keys[rows[inside], cols[inside] - c0] = INT64_MAX                          # lands after every match
        positions = torch.searchsorted(match_keys, keys, out_int32=True)          # [Q, c1-c0] in 0..M
        del keys
        positions += row_offsets
        counts += torch.bincount(positions.view(-1), minlength=len(counts))
    ranks = counts.view(num_query, width + 1)[:, :width].cumsum(1)
    return ranks + torch.arange(1, width + 1, device=device), num_matches


def _query_metrics(ranks, num_matches):
    """Per-query AP, trapezoid AP (Market-1501 official), INP and first-hit rank from match ranks."""
    hits = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)  # k = 1..M
    in_row = hits[None, :] <= num_matches[:, None]                                # [Q, M]
    r = ranks.double()                                                            # >= 1
    precision = hits / r                                                          # k / rank_k
    before = torch.where(r > 1, (hits - 1) / (r - 1).clamp(min=1), torch.ones_like(r))  # precision one rank earlier
    m = num_matches.double().clamp(min=1)
    ap = (precision * in_row).sum(1) / m
    ap_trapezoid = ((precision + before) / 2 * in_row).sum(1) / m
    last = ranks.gather(1, (num_matches - 1).clamp(min=0)[:, None])[:, 0].double()
    inp = num_matches.double() / last.clamp(min=1)
    return {"ap": ap, "ap_trapezoid": ap_trapezoid, "inp": inp, "first": ranks[:, 0],
            "num_matches": num_matches}


def _chunk_shape(num_gallery, chunk_bytes):
    """(queries, gallery items) per chunk: whole rows while at least MIN_ROWS fit in chunk_bytes, else
    gallery blocks of chunk_bytes / MIN_ROWS items (the memory then does not depend on the gallery)."""
    items = max(chunk_bytes // BYTES_PER_ITEM, 1)
    block = max(min(num_gallery, items // MIN_ROWS), 1)
    return max(items // block, 1), block


@contextlib.contextmanager
def _intra_op_threads(num):
    """Run torch CPU ops with num threads inside the block, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _workers(device, num_chunks):
    """Chunks evaluated at once: torch's CPU thread count on the CPU, one on an accelerator."""
    return max(1, min(torch.get_num_threads(), num_chunks)) if torch.device(device).type == "cpu" else 1


def memory_plan(num_query, num_gallery, device, chunk_bytes=CHUNK_BYTES):
    """(queries per chunk, gallery items per block, chunks at once, bytes of live temporaries by design) of
    evaluate_rank / evaluate_feature_ranks on a num_query x num_gallery problem with torch's threads now."""
    rows, block = _chunk_shape(num_gallery, chunk_bytes)
    workers = _workers(device, math.ceil(num_query / rows))
    return rows, block, workers, workers * rows * block * BYTES_PER_ITEM + GALLERY_BYTES_PER_ITEM * num_gallery


def _per_query(source, num_query, num_gallery, q_pids, g_pids, q_camids, g_camids, device,
               camera_agnostic, chunk_bytes, camera_sets=False):
    """Per-query metrics (CPU tensors) of queries 0..num_query whose distances `source` gives."""
    q_pids, q_camids = _as_tensor(q_pids, device, torch.int64), _as_tensor(q_camids, device, torch.int64)
    by_pid = gallery_by_pid(_as_tensor(g_pids, device, torch.int64))
    g_camids = _as_tensor(g_camids, device, torch.int64)
    rows, block = _chunk_shape(num_gallery, chunk_bytes)

    def chunk(a):
        b = min(a + rows, num_query)
        ranks, num_matches = rank_true_matches(source, a, b, num_gallery, q_pids[a:b], q_camids[a:b], g_camids,
                                               by_pid, camera_agnostic, block, camera_sets)
        return {k: v.cpu() for k, v in _query_metrics(ranks, num_matches).items()}

    starts = range(0, num_query, rows)
    workers = _workers(device, len(starts))
    if workers > 1:
        # Chunks run in parallel Python threads, each op on one thread: with torch's intra-op threads
        # every small op ends in a barrier, and on a busy machine (data-loader workers, other jobs) a
        # descheduled thread stalls each barrier - measured 5-20x slower than one thread.
        with _intra_op_threads(1), concurrent.futures.ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(chunk, starts))
    else:
        parts = [chunk(a) for a in starts]
    return {k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0) for k in
            ("ap", "ap_trapezoid", "inp", "first", "num_matches")}


def _no_valid_query_message(q_pids, g_pids, q_camids, g_camids):
    """Why no query kept a true match, and what to do about it."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    if len(q_pids) == 0 or len(g_pids) == 0:
        return f"no query can be evaluated: {len(q_pids)} queries, {len(g_pids)} gallery items"
    if not np.isin(q_pids, g_pids).any():
        return ("no query identity appears in the gallery: check that query and gallery come from the same "
                "data set and keep its own pids")
    cams = np.union1d(np.unique(np.asarray(q_camids)), np.unique(np.asarray(g_camids)))
    return (f"no query has a true match in the gallery after removing same-identity images of the query's "
            f"camera (cameras seen: {cams.tolist()}): every matching gallery image comes from the query's "
            f"own camera" + (" - the data look like single-camera data" if len(cams) == 1 else "") +
            ". For data without distinct cameras evaluate camera-agnostically: evaluate_rank(..., "
            "camera_agnostic=True), or --TEST.CAMERA_AGNOSTIC true on the command line.")


def _summarise(per_query, max_rank):
    """Mean metrics over valid queries; CMC from first-hit ranks (monotone, defined for short galleries)."""
    valid = per_query["num_matches"] > 0
    first = per_query["first"][valid]
    cmc = (first[:, None] <= torch.arange(1, max_rank + 1)[None, :]).double().mean(0)
    return {"mAP": float(per_query["ap"][valid].mean()), "mINP": float(per_query["inp"][valid].mean()),
            "mAP_trapezoid": float(per_query["ap_trapezoid"][valid].mean()), "cmc": cmc.numpy(),
            "num_valid_queries": int(valid.sum()), "num_skipped_queries": int((~valid).sum())}


def _check_lengths(distmat_shape, q_pids, g_pids, q_camids, g_camids):
    """Raise EvaluationError naming the argument whose length disagrees with the distance matrix."""
    if len(distmat_shape) != 2:
        raise EvaluationError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(distmat_shape)}")
    for name, x, n in (("q_pids", q_pids, 0), ("q_camids", q_camids, 0), ("g_pids", g_pids, 1),
                       ("g_camids", g_camids, 1)):
        if len(x) != distmat_shape[n]:
            raise EvaluationError(f"{name} has {len(x)} entries but distmat has {distmat_shape[n]} "
                                  f"{'rows (queries)' if n == 0 else 'columns (gallery items)'}")


def _matrix_source(dist):
    """evaluate's (block distances, pair distances) source over a [Q, N] matrix."""
    return lambda a, b, c0, c1: dist[a:b, c0:c1], lambda rows, cols: dist[rows, cols]


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, camera_agnostic=False,
                  chunk_bytes=CHUNK_BYTES, return_per_query=False):
    """mAP, mINP, CMC (and the Market-1501 trapezoid mAP) of a [num_query, num_gallery] distance matrix.

    Arguments as torchreid's/fast-reid's evaluate_rank (numpy arrays or tensors, any device: the work
    runs on distmat's device). camera_agnostic=True removes nothing (single-camera data). Values are
    fractions in 0..1; raises EvaluationError when no query has a true match.
    """
    distmat = torch.as_tensor(distmat) if not torch.is_tensor(distmat) else distmat
    _check_lengths(distmat.shape, q_pids, g_pids, q_camids, g_camids)
    per_query = _per_query(_matrix_source(distmat), distmat.shape[0], distmat.shape[1], q_pids, g_pids,
                           q_camids, g_camids, distmat.device, camera_agnostic, chunk_bytes)
    return _finish(per_query, max_rank, return_per_query, q_pids, g_pids, q_camids, g_camids)


def _finish(per_query, max_rank, return_per_query, q_pids, g_pids, q_camids, g_camids):
    """Summarise per-query metrics, raising the explanatory error when no query was valid."""
    if not bool((per_query["num_matches"] > 0).any()):
        raise EvaluationError(_no_valid_query_message(_np(q_pids), _np(g_pids), _np(q_camids), _np(g_camids)))
    result = _summarise(per_query, max_rank)
    if return_per_query:
        result["per_query"] = per_query
    return result


def _np(x):
    """Tensor or array -> numpy array."""
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# ---------------------------------------------------------------------------------------------------
# Features, distances and centroids

def squared_distances(q_feats, g_feats, q_sq=None, g_sq=None):
    """[Q, D] x [N, D] -> [Q, N] float32 squared Euclidean distances (cosine order for unit vectors)."""
    q_sq = _squared_norms(q_feats) if q_sq is None else q_sq                      # [Q]
    g_sq = _squared_norms(g_feats) if g_sq is None else g_sq                      # [N], reusable across chunks
    dist = q_sq[:, None] + g_sq[None, :]
    return dist.addmm_(q_feats, g_feats.t(), alpha=-2).clamp_(min=0)


def _squared_norms(feats):
    """Squared L2 norm of each row [N] (a reduction: no temporary the size of feats, unlike (x * x).sum)."""
    return torch.linalg.vector_norm(feats, dim=1).square()


DISTANCES = ("euclidean", "cosine")  # SOLVER.DISTANCE_FUNC, as the original's utils/reid_metric.py ranks by it


def _feature_source(q_feats, g_feats, distance="euclidean"):
    """Distances of query/gallery embeddings, as a source for rank_true_matches (on q_feats' device). euclidean:
    squared Euclidean distances (the order of the original's get_euclidean); cosine: those of the L2-normalised
    rows, 2 - 2 cos, which rank as the original's get_cosine, 1 - cos."""
    q_feats, g_feats = q_feats.float(), g_feats.float().to(q_feats.device)
    if distance == "cosine":
        q_feats, g_feats = _normalize(q_feats), _normalize(g_feats)
    q_sq, g_sq = _squared_norms(q_feats), _squared_norms(g_feats)

    def pairs(rows, cols):  # same formula as the blocks, one pair at a time
        dots = (q_feats[rows] * g_feats[cols]).sum(1)
        return (q_sq[rows] + g_sq[cols] - 2 * dots).clamp_(min=0)
    return lambda a, b, c0, c1: squared_distances(q_feats[a:b], g_feats[c0:c1], q_sq[a:b], g_sq[c0:c1]), pairs


def evaluate_feature_ranks(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, max_rank=50,
                           camera_agnostic=False, chunk_bytes=CHUNK_BYTES, return_per_query=False,
                           distance="euclidean"):
    """evaluate_rank on embeddings, distances computed chunk by chunk: no [Q, N] matrix is ever held; distance is
    SOLVER.DISTANCE_FUNC (euclidean or cosine)."""
    _check_lengths((len(q_feats), len(g_feats)), q_pids, g_pids, q_camids, g_camids)
    _check_distance(distance)
    per_query = _per_query(_feature_source(q_feats, g_feats, distance), len(q_feats), len(g_feats),
                           q_pids, g_pids, q_camids, g_camids, q_feats.device, camera_agnostic, chunk_bytes)
    return _finish(per_query, max_rank, return_per_query, q_pids, g_pids, q_camids, g_camids)


def _normalize(x):
    """L2-normalise rows (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, dim=1)


# ---------------------------------------------------------------------------------------------------
# Centroid evaluation: single-image queries against per-identity gallery centroids, by one of three rules

CENTROID_PROTOCOLS = ("standard", "original", "original_fixed")
PROTOCOL_NOTES = {
    "standard": "the Market rule on centroids: the query's identity from its gallery images of the other "
                "cameras, every other identity from all its images, distractors as single images",
    "original": "centroids-reid a1825b7's rule, its camera-index bug included (the paper's table)",
    "original_fixed": "centroids-reid a1825b7's rule with its camera index corrected",
}


def _check_distance(distance):
    """Raise EvaluationError naming the distances when `distance` is not one of them."""
    if distance not in DISTANCES:
        raise EvaluationError(f"distance {distance!r} is unknown (SOLVER.DISTANCE_FUNC): choose one of "
                              f"{', '.join(DISTANCES)}")


def _check_protocol(centroid_protocol, allowed=CENTROID_PROTOCOLS):
    """Raise EvaluationError naming the valid protocols when centroid_protocol is not one of them."""
    if centroid_protocol not in allowed:
        raise EvaluationError(f"centroid_protocol {centroid_protocol!r} is unknown: choose one of "
                              f"{', '.join(allowed)}")


def _group_sums(feats, groups, num_groups):
    """(sums [G, D], counts [G]) of feats' rows by group id 0..G-1; rows with id G are left out (no copy)."""
    sums = torch.zeros(num_groups + 1, feats.shape[1], device=feats.device).index_add_(0, groups, feats)
    return sums[:-1], torch.bincount(groups, minlength=num_groups + 1)[:-1]


def identity_centroids(g_feats, g_pids, g_camids=None, exclude_camid=None, normalize=True):
    """Mean embedding per gallery identity (pid > 0), from its images of cameras != exclude_camid.

    Returns (centroids [P', D], pids [P']) for the identities that keep at least one image. One
    index_add over the gallery; excluded images go to a spare row that is dropped (no copy of feats).
    """
    g_feats = g_feats.float()
    g_pids = _as_tensor(g_pids, g_feats.device, torch.int64)
    pids, slot = torch.unique(g_pids, return_inverse=True)                         # [P], [N]
    if exclude_camid is not None:
        slot = slot.masked_fill(_as_tensor(g_camids, g_feats.device, torch.int64) == exclude_camid, len(pids))
    sums, counts = _group_sums(g_feats, slot, len(pids))
    has_images = (counts > 0) & (pids > 0)  # pid 0 = distractors: never averaged into one "identity"
    centroids = sums[has_images] / counts[has_images, None]
    return (_normalize(centroids) if normalize else centroids), pids[has_images]


def _camera_codes(q_camids, g_camids):
    """Cameras as indices 0..K-1 over the cameras query and gallery use: (K, query indices, gallery indices)."""
    cams = torch.unique(torch.cat([q_camids, g_camids]))
    return len(cams), torch.searchsorted(cams, q_camids.contiguous()), torch.searchsorted(cams, g_camids.contiguous())


def _query_slots(q_pids, pids):
    """Index of each query's pid in the sorted gallery pids; -1 where the gallery lacks that pid."""
    if len(pids) == 0:
        return torch.full_like(q_pids, -1)
    slots = torch.searchsorted(pids, q_pids.contiguous()).clamp_(max=len(pids) - 1)
    return torch.where(pids[slots] == q_pids, slots, -1)


def _other_camera_means(g_feats, g_slots, g_cams, num_cams, sums, counts, pair_keys):
    """Per pair key = identity slot * num_cams + camera (sorted, unique): the mean of that identity's gallery
    images of the OTHER cameras [K, D], and how many they are [K] (0: none; the mean row is then 0).

    The identity's sum minus its sum on that camera: one index_add over the gallery serves all pairs."""
    if len(pair_keys) == 0:
        return g_feats.new_zeros(0, g_feats.shape[1]), counts.new_zeros(0)
    g_keys = g_slots * num_cams + g_cams                                           # [N]
    rows = torch.searchsorted(pair_keys, g_keys).clamp_(max=len(pair_keys) - 1)
    rows = torch.where(pair_keys[rows] == g_keys, rows, len(pair_keys))           # images of no pair: left out
    cam_sums, cam_counts = _group_sums(g_feats, rows, len(pair_keys))
    pair_slots = pair_keys // num_cams
    others = counts[pair_slots] - cam_counts
    return (sums[pair_slots] - cam_sums) / others.clamp(min=1)[:, None], others


def _standard_gallery(q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware, normalize, no_camera):
    """The standard rule's gallery and, camera-aware, each query's own-identity centroid.

    Returns ((feats, pids, camids), own): the gallery is one centroid per identity (pid > 0) from all its
    images, camid no_camera, then the distractor images as they are. own = (own_feats [K, D], q_own [Q]):
    one centroid of an identity's images from the cameras other than c per (identity, camera c) pair some
    query needs, and each query's row there (-1: its identity has no gallery image outside its camera, or
    none at all); None when not camera_aware.
    """
    pids, g_slots = torch.unique(g_pids, return_inverse=True)                      # [P], [N]
    sums, counts = _group_sums(g_feats, g_slots, len(pids))
    is_identity = pids > 0  # pid 0 = distractors: never averaged into one "identity"
    centroids = sums[is_identity] / counts[is_identity, None]
    distractors = g_pids == 0
    feats = torch.cat([_normalize(centroids) if normalize else centroids, g_feats[distractors]])
    c_pids = torch.cat([pids[is_identity], g_pids[distractors]])
    c_camids = torch.cat([torch.full_like(pids[is_identity], no_camera), g_camids[distractors]])
    if not camera_aware:
        return (feats, c_pids, c_camids), None
    num_cams, q_cams, g_cams = _camera_codes(q_camids, g_camids)
    q_slots = _query_slots(q_pids, pids)
    needs = (q_slots >= 0) & (q_pids > 0)
    keys, q_keys = torch.unique((q_slots * num_cams + q_cams)[needs], return_inverse=True)
    own, others = _other_camera_means(g_feats, g_slots, g_cams, num_cams, sums, counts, keys)
    q_own = torch.full_like(q_pids, -1)
    q_own[needs] = torch.where(others[q_keys] > 0, q_keys, -1)
    return (feats, c_pids, c_camids), (_normalize(own) if normalize else own, q_own)


def _own_centroid_source(q_feats, feats, num_centroids, own_feats, q_own, distance="euclidean"):
    """Distances to the standard gallery, with each query's own-identity centroid (a column below
    num_centroids) replaced by its other-cameras centroid own_feats[q_own]. rank_true_matches asks
    pair distances only for true matches and masks all same-pid columns of the blocks, so the
    replacement happens in the pair distances alone: the blocks stay one matrix product."""
    blocks, pairs = _feature_source(q_feats, feats, distance)
    own_pairs = _feature_source(q_feats, own_feats, distance)[1]

    def replaced(rows, cols):
        dist = pairs(rows, cols)
        own = cols < num_centroids
        dist[own] = own_pairs(rows[own], q_own[rows[own]])
        return dist
    return blocks, replaced


def _standard_per_query(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware, camera_agnostic,
                        normalize, chunk_bytes, distance="euclidean"):
    """Per-query metrics of the standard rule (see evaluate_centroids)."""
    no_camera = int(torch.cat([q_camids, g_camids]).min()) - 1 if len(q_camids) + len(g_camids) else -1
    (feats, pids, camids), own = _standard_gallery(q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware,
                                                   normalize, no_camera)
    source = _feature_source(q_feats, feats, distance)
    if own is not None:
        own_feats, q_own = own
        source = _own_centroid_source(q_feats, feats, int((pids > 0).sum()), own_feats, q_own, distance)
        # a query without an other-cameras centroid shares its identity centroid's camera: that one is removed
        q_camids = torch.where((q_own < 0) & (q_pids > 0), no_camera, q_camids)
    return _per_query(source, len(q_feats), len(feats), q_pids, pids, q_camids, camids, q_feats.device,
                      camera_agnostic, chunk_bytes)


def _first_of_each(slots, sets):
    """Mask of the first row of every distinct (slot, set) pair."""
    if len(slots) == 0:
        return torch.zeros(0, dtype=torch.bool, device=slots.device)
    _, groups = torch.unique(torch.stack([slots, sets], 1), dim=0, return_inverse=True)
    rows = torch.arange(len(slots), device=slots.device)
    first = torch.full((int(groups.max()) + 1,), len(slots), device=slots.device).scatter_reduce_(
        0, groups, rows, "amin")
    return torch.zeros_like(slots, dtype=torch.bool).index_fill_(0, first, True)


def _original_gallery(q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware, index_bug, normalize):
    """The original's centroids: (feats, pids, camera-set bit masks or None, query camera bits or None)."""
    if index_bug:  # its camids[inds]: gallery offsets read in [query camids, gallery camids]
        g_camids = torch.cat([q_camids, g_camids])[:len(g_camids)]
    pids, g_slots = torch.unique(g_pids, return_inverse=True)  # every gallery label, pid 0 included
    sums, counts = _group_sums(g_feats, g_slots, len(pids))
    if not camera_aware:
        means = sums / counts[:, None]
        return (_normalize(means) if normalize else means), pids, None, None
    num_cams, q_cams, g_cams = _camera_codes(q_camids, g_camids)
    if num_cams > 62:
        raise EvaluationError(f"centroid_protocol original: {num_cams} cameras, at most 62 are supported "
                              "(camera sets are int64 bit masks); evaluate camera-agnostically instead")
    bits = 1 << torch.arange(num_cams, device=g_feats.device)
    seen = torch.zeros(len(pids), num_cams, dtype=torch.bool, device=g_feats.device)
    seen[g_slots, g_cams] = True
    q_slots = _query_slots(q_pids, pids)
    keys = torch.unique((q_slots * num_cams + q_cams)[q_slots >= 0])  # identity, then camera: its loop order
    slots, cams = keys // num_cams, keys % num_cams
    sets = (seen[slots] * bits).sum(1) & ~bits[cams]  # the cameras each centroid is made from
    keep = sets != 0  # no image outside that camera: no centroid
    keep[keep.clone()] = _first_of_each(slots[keep], sets[keep])  # a camera set seen before: dropped
    means, _ = _other_camera_means(g_feats, g_slots, g_cams, num_cams, sums, counts, keys[keep])
    return (_normalize(means) if normalize else means), pids[slots[keep]], sets[keep], bits[q_cams]


def _original_per_query(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware, index_bug,
                        normalize, chunk_bytes, source_of=None, distance="euclidean"):
    """Per-query metrics of the original's rule (see evaluate_centroids); source_of(queries, gallery entries) gives
    the distances (default: from the features by `distance`; evaluate_reranked passes re-ranked ones)."""
    feats, pids, sets, q_bits = _original_gallery(q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware,
                                                  index_bug, normalize)
    q_feats = _normalize(q_feats) if normalize else q_feats  # its R1_mAP.compute normalises queries too
    source = source_of(q_feats, feats) if source_of else _feature_source(q_feats, feats, distance)
    if not camera_aware:  # its dummy camids (queries 0, centroids 1): nothing is removed
        return _per_query(source, len(q_feats), len(feats), q_pids, pids, q_camids, torch.zeros_like(pids),
                          q_feats.device, True, chunk_bytes)
    return _per_query(source, len(q_feats), len(feats), q_pids, pids, q_bits, sets, q_feats.device, False,
                      chunk_bytes, camera_sets=True)


def evaluate_centroids(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, keep_camid_centroids=True,
                       max_rank=50, camera_agnostic=False, normalize_centroids=True, chunk_bytes=CHUNK_BYTES,
                       return_per_query=False, centroid_protocol="standard", raw_feats=False, distance="euclidean"):
    """Single-image queries against per-identity gallery centroids, by one of three rules; metrics as
    evaluate_rank's, with result["protocol"] = centroid_protocol. Every rule ranks by `distance` (SOLVER.DISTANCE_FUNC:
    cosine compares the L2-normalised query and centroid, so the centroids average the embeddings as given).

    "standard" (Market's rule on centroids): a query (pid p, camera c) is compared with p's centroid of
    p's gallery images from cameras != c, with every other identity's centroid of all its gallery images
    (camera c included: those are the hardest negatives), and with each distractor (pid 0) image as it
    is. A query whose identity has no gallery image outside camera c has no true match: skipped and
    counted, as per image. One centroid per identity plus one per (identity, camera) pair that queries
    need; the own-identity distance is replaced inside the chunked ranking, no loop over queries.
    Centroids are the mean of the given embeddings, L2-normalised when normalize_centroids.

    "original" reproduces centroids-reid a1825b7 (modelling/bases.py validation_create_centroids,
    utils/reid_metric.py R1_mAP.compute, utils/eval_reid.py eval_func), step for step:
      1. gallery labels are taken in sorted order, pid 0 included; a label that no query has gets NO
         centroid (so with cameras, distractors and unqueried identities drop out of the gallery);
      2. per label, for each camera its queries use (sorted): a centroid of the label's gallery images
         whose camera differs from it, skipped when there is none, and dropped when the set of cameras
         it is made from equals that of an earlier centroid of the label; it keeps that camera set;
      3. the gallery cameras of step 2 are read with its bug: camids[inds] with gallery offsets into
         [query camids, gallery camids], i.e. gallery image j "has" item j's camera of that list;
      4. the mean is taken on the embeddings as given, then queries and centroids are L2-normalised
         when normalize_centroids (its TEST.FEAT_NORM);
      5. a same-identity centroid is removed for a query whose camera is in its camera set; the other
         same-identity centroids are true matches; a query left without one is skipped;
      6. keep_camid_centroids=False or camera_agnostic: one centroid per gallery label from all its
         images, pid 0 averaged into one "identity", nothing removed (its dummy camids).
    Not reproduced: its ties follow np.argsort (quicksort, unordered); here ties go by gallery order.
    Step 3 depends on the order of the items: the original listed files in glob order (unsorted).
    "original_fixed" is the same with step 3 corrected (each gallery image's own camera).

    Caller contract: the original averaged RAW embeddings (BN output) and normalised after. Pass
    raw_feats=True with raw embeddings (extract_features(..., feat_norm=False)) to reproduce it exactly:
    then "standard" L2-normalises every image first when normalize_centroids (what per-image
    evaluation sees). With raw_feats=False (the default, extract_features' output, already normalised
    when feat_norm is on) the "original" rules average the normalised embeddings: a close variant.
    """
    _check_protocol(centroid_protocol)
    _check_distance(distance)
    _check_lengths((len(q_feats), len(g_feats)), q_pids, g_pids, q_camids, g_camids)
    device = q_feats.device
    q_feats, g_feats = q_feats.float(), g_feats.float().to(device)
    labels = [_as_tensor(x, device, torch.int64) for x in (q_pids, q_camids, g_pids, g_camids)]
    camera_aware = keep_camid_centroids and not camera_agnostic
    if centroid_protocol == "standard":
        if raw_feats and normalize_centroids:
            q_feats, g_feats = _normalize(q_feats), _normalize(g_feats)
        per_query = _standard_per_query(q_feats, labels[0], labels[1], g_feats, labels[2], labels[3], camera_aware,
                                        camera_agnostic, normalize_centroids, chunk_bytes, distance)
    else:
        per_query = _original_per_query(q_feats, labels[0], labels[1], g_feats, labels[2], labels[3], camera_aware,
                                        centroid_protocol == "original", normalize_centroids, chunk_bytes,
                                        distance=distance)
    result = _finish(per_query, max_rank, return_per_query, q_pids, g_pids, q_camids, g_camids)
    result["protocol"] = centroid_protocol
    return result


def centroid_key(protocol, protocols):
    """The results key of a protocol's centroid row: 'centroid' for the first, 'centroid_<protocol>' after."""
    return "centroid" if protocol == protocols[0] else f"centroid_{protocol}"


def evaluate_features(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, keep_camid_centroids=True,
                      max_rank=50, camera_agnostic=False, normalize_centroids=True, chunk_bytes=CHUNK_BYTES,
                      centroid_protocol="standard", raw_feats=False, distance="euclidean"):
    """Evaluate embeddings per image and per centroid: {'image': metrics, 'centroid': metrics}, ranked by
    `distance` (SOLVER.DISTANCE_FUNC: euclidean or cosine, as the original's evaluation).

    centroid_protocol: one of CENTROID_PROTOCOLS (evaluate_centroids), or "all": then 'centroid' holds
    the standard row and 'centroid_original', 'centroid_original_fixed' the others (each row names its
    protocol in res['protocol']). raw_feats=True: q/g feats are raw embeddings; per-image and standard
    evaluation L2-normalise them first when normalize_centroids (TEST.FEAT_NORM), the original rules
    average them raw as the original did.
    """
    _check_protocol(centroid_protocol, CENTROID_PROTOCOLS + ("all",))
    protocols = CENTROID_PROTOCOLS if centroid_protocol == "all" else (centroid_protocol,)
    common = dict(max_rank=max_rank, camera_agnostic=camera_agnostic, chunk_bytes=chunk_bytes, distance=distance)
    unit_q, unit_g = (_normalize(q_feats.float()), _normalize(g_feats.float())) if raw_feats and \
        normalize_centroids else (q_feats, g_feats)
    results = {"image": evaluate_feature_ranks(unit_q, q_pids, q_camids, unit_g, g_pids, g_camids, **common)}
    for protocol in protocols:
        raw = raw_feats and protocol != "standard"
        results[centroid_key(protocol, protocols)] = evaluate_centroids(
            q_feats if raw else unit_q, q_pids, q_camids, g_feats if raw else unit_g, g_pids, g_camids,
            keep_camid_centroids=keep_camid_centroids, normalize_centroids=normalize_centroids,
            centroid_protocol=protocol, raw_feats=raw, **common)
    return results


def extract_features(model, loader, device, flip=False, feat_norm=True, amp_dtype=None):
    """Embed every image of a loader of (img, pid, camid): (feats [N, D] float32 CPU, pids, camids numpy).

    The loader may be build_test_loader's (host tensors) or device_data.device_test_batches (images decoded on the
    device). Embeddings stay on the device until the end: one transfer, no host sync per batch, so the host
    prepares the next batch while the device embeds this one."""
    model.eval()
    feats, pids, camids = [], [], []
    with torch.inference_mode(), utils.autocast(device, amp_dtype):
        for imgs, batch_pids, batch_camids in tqdm(loader, desc="features", unit="batch", leave=False):
            # channels-last on accelerators, as the model is there in training
            imgs = imgs.to(device, non_blocking=True, memory_format=utils.memory_format(device))
            emb = model(imgs).float()
            if flip:  # the mirror image is as likely a view of the person: average the two embeddings
                emb = (emb + model(imgs.flip(-1)).float()) / 2
            feats.append(_normalize(emb) if feat_norm else emb)
            pids.append(np.asarray(batch_pids))
            camids.append(np.asarray(batch_camids))
    if not feats:
        raise EvaluationError("the loader yielded no images: the query or gallery list is empty")
    return torch.cat(feats).cpu(), np.concatenate(pids).astype(np.int64), np.concatenate(camids).astype(np.int64)


def extract_split(model, items, cfg, device, amp_dtype=None, rank=0, world_size=1, size=None):
    """Embed this rank's contiguous shard of (path, pid, camid) items and gather every shard, in order, on every
    rank: [N, D] on the device. A file that cannot be read raises DataError on every rank (its message from the
    rank that met it), so that all ranks stop together rather than wait in the gather for the one that failed."""
    start, end = utils.shard_bounds(len(items), rank, world_size)
    feats, failure = None, None
    if start < end:  # else more ranks than a shard needs (e.g. 5 items, 4 ranks): nothing to embed, still gather
        try:
            feats = _embed_shard(model, items[start:end], cfg, device, amp_dtype, size).to(device)
        except DataError as err:
            if world_size == 1:
                raise
            failure = str(err)
    if world_size > 1:
        failures = [message for message in utils.all_gather_objects(failure) if message]
        if failures:
            raise DataError(failures[0])
    if feats is None:
        feats = torch.zeros(0, model.feat_dim, device=device)
    return utils.gather_rows(feats, len(items))  # metrics then run on the device too


def _embed_shard(model, items, cfg, device, amp_dtype=None, size=None):
    """Raw embeddings [n, D] of (path, pid, camid) items, decoded on the CPU or, with INPUT.DEVICE_AUGMENT, on
    the device."""
    spec = embed_spec(cfg, amp_dtype, size)
    if cfg.INPUT.DEVICE_AUGMENT:  # decode, resize and normalise on the device: the CPU loader stops being the limit
        loader = device_test_batches(items, spec, device)
    else:
        loader = build_test_loader(items, spec)
    # raw embeddings: the original's centroid rule averages them before normalising (evaluate_features)
    feats, _, _ = extract_features(model, loader, device, flip=spec.flip, feat_norm=False, amp_dtype=spec.amp_dtype)
    return feats


def evaluate_splits(model, data, cfg, device, amp_dtype=None, rank=0, world_size=1, size=None):
    """The one evaluation path (per epoch in train.py, sharded over ranks; the evaluate CLI): embed query and
    gallery, evaluate per image and per centroid (re-ranked with TEST.RERANK). Returns (results, (q_feats,
    g_feats)) on rank 0, (None, None) on the others; the features are the raw embeddings (evaluate_features
    normalises them when TEST.FEAT_NORM)."""
    utils.broadcast_buffers(model)  # every shard embedded by the model rank 0 holds
    q_feats = extract_split(model, data["query"], cfg, device, amp_dtype, rank, world_size, size)
    g_feats = extract_split(model, data["gallery"], cfg, device, amp_dtype, rank, world_size, size)
    if rank != 0:
        return None, None
    labels = (*item_labels(data["query"]), g_feats, *item_labels(data["gallery"]))
    arguments = {"raw_feats": True, **evaluation_arguments(cfg, data["has_cameras"])}
    if cfg.TEST.RERANK:
        results = evaluate_reranked(q_feats, *labels, k1=cfg.TEST.RERANK_K1, k2=cfg.TEST.RERANK_K2,
                                    lambda_value=cfg.TEST.RERANK_LAMBDA, **arguments)
    else:
        results = evaluate_features(q_feats, *labels, **arguments)
    return results, (q_feats, g_feats)


def format_results(results):
    """A small table of mAP, R1, R5, R10, mINP in % for the per-image and centroid rows, then a line naming
    the centroid protocol(s); with several protocols their rows follow the per-image row, one each."""
    centroid_rows = [res for key, res in results.items() if key.startswith("centroid") and res is not None]
    several = len(centroid_rows) > 1
    rows = [("per image", results["image"])] if results.get("image") is not None else []
    rows += [(f"centroid {res['protocol']}" if several and "protocol" in res else "centroid", res)
             for res in centroid_rows]
    width = max([10] + [len(label) for label, _ in rows])
    lines = [f"{'':{width}s} {'mAP %':>7s} {'R1 %':>7s} {'R5 %':>7s} {'R10 %':>7s} {'mINP %':>7s} {'queries':>8s}"]
    for label, res in rows:
        cmc = [100 * res["cmc"][k - 1] if k <= len(res["cmc"]) else float("nan") for k in (1, 5, 10)]
        lines.append(f"{label:{width}s} {100 * res['mAP']:7.2f} {cmc[0]:7.2f} {cmc[1]:7.2f} {cmc[2]:7.2f} "
                     f"{100 * res['mINP']:7.2f} {res['num_valid_queries']:8d}")
    named = [res["protocol"] for res in centroid_rows if res.get("protocol") in PROTOCOL_NOTES]
    if named:
        lines.append(f"centroid protocol{'s' if len(named) > 1 else ''}: " +
                     "; ".join(f"{name} = {PROTOCOL_NOTES[name]}" for name in named))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (rerank.py) per image and per centroid

def _other_camera_grid(q_pids, q_camids, g_feats, g_pids, g_camids, normalize):
    """Each identity's centroid of its gallery images outside camera c, for EVERY camera c it has such images for
    (not only the pairs queries need: the re-ranking pool then owes nothing to the queries' identities), and each
    query's row there (-1: its identity has no gallery image outside its camera)."""
    gallery_pids, g_slots = torch.unique(g_pids, return_inverse=True)
    sums, counts = _group_sums(g_feats, g_slots, len(gallery_pids))
    num_cams, q_cams, g_cams = _camera_codes(q_camids, g_camids)
    slots = torch.nonzero(gallery_pids > 0)[:, 0]
    keys = (slots[:, None] * num_cams + torch.arange(num_cams, device=slots.device)).reshape(-1)  # sorted
    means, others = _other_camera_means(g_feats, g_slots, g_cams, num_cams, sums, counts, keys)
    keys, means = keys[others > 0], means[others > 0]
    q_slots = _query_slots(q_pids, gallery_pids)
    q_keys = q_slots * num_cams + q_cams
    rows = torch.searchsorted(keys, q_keys).clamp_(max=max(len(keys) - 1, 0))
    found = (q_slots >= 0) & (q_pids > 0) & (keys[rows] == q_keys) if len(keys) else torch.zeros_like(q_pids).bool()
    return (_normalize(means) if normalize else means), torch.where(found, rows, -1)


def _standard_reranked(rerank, q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, camera_aware,
                       camera_agnostic, normalize, chunk_bytes):
    """Per-query metrics of evaluate's standard centroid rule on re-ranked distances. The pool holds the queries,
    the identity centroids, the distractor images and, camera-aware, every other-cameras centroid; a query's own
    identity then takes its other-cameras centroid's distance (as evaluate._own_centroid_source)."""
    no_camera = int(torch.cat([q_camids, g_camids]).min()) - 1
    (feats, pids, camids), _ = _standard_gallery(q_pids, q_camids, g_feats, g_pids, g_camids, False, normalize,
                                                    no_camera)
    if not camera_aware:
        return _per_query(_matrix_source(rerank(q_feats, feats)), len(q_feats), len(feats), q_pids, pids,
                             q_camids, camids, q_feats.device, camera_agnostic, chunk_bytes)
    own_feats, q_own = _other_camera_grid(q_pids, q_camids, g_feats, g_pids, g_camids, normalize)
    dist = rerank(q_feats, torch.cat([feats, own_feats]))
    num_centroids = int((pids > 0).sum())

    def pairs(rows, cols):  # asked for true matches only: a centroid column is the query's own identity
        return dist[rows, torch.where(cols < num_centroids, len(feats) + q_own[rows], cols)]
    q_camids = torch.where((q_own < 0) & (q_pids > 0), no_camera, q_camids)  # no such centroid: no true match
    return _per_query((_matrix_source(dist)[0], pairs), len(q_feats), len(feats), q_pids, pids, q_camids, camids,
                         q_feats.device, camera_agnostic, chunk_bytes)


def evaluate_reranked(q_feats, q_pids, q_camids, g_feats, g_pids, g_camids, k1=20, k2=6, lambda_value=0.3,
                      keep_camid_centroids=True, max_rank=50, camera_agnostic=False, normalize_centroids=True,
                      chunk_bytes=None, centroid_protocol="standard", raw_feats=False, distance="euclidean"):
    """evaluate.evaluate_features (same arguments, same result keys) on k-reciprocal re-ranked distances (cosine:
    of the L2-normalised embeddings).

    Per image the gallery images are re-ranked; per centroid the gallery of each centroid rule (its centroids,
    and its distractor images where the rule keeps them; for the camera-aware standard rule also every identity's
    other-cameras centroids), pooled with all queries as the paper's probes.
    """
    _check_protocol(centroid_protocol, CENTROID_PROTOCOLS + ("all",))
    _check_distance(distance)
    protocols = CENTROID_PROTOCOLS if centroid_protocol == "all" else (centroid_protocol,)
    chunk_bytes, device = chunk_bytes or CHUNK_BYTES, q_feats.device
    q_feats, g_feats = q_feats.float(), g_feats.float().to(device)
    q_pids, q_camids, g_pids, g_camids = (_as_tensor(x, device, torch.int64) for x in (q_pids, q_camids, g_pids,
                                                                                            g_camids))
    unit = raw_feats and normalize_centroids  # raw embeddings: normalised for all but the original rules
    unit_q, unit_g = (_normalize(q_feats), _normalize(g_feats)) if unit else (q_feats, g_feats)

    def rerank(q, g):
        if distance == "cosine":  # re-ranked from cosine distances: those of the normalised embeddings
            q, g = _normalize(q), _normalize(g)
        return rerank_distances(q, g, k1, k2, lambda_value)
    labels = (q_pids, g_pids, q_camids, g_camids)  # evaluate_rank's order
    results = {"image": evaluate_rank(rerank(unit_q, unit_g), *labels, max_rank, camera_agnostic, chunk_bytes)}
    camera_aware = keep_camid_centroids and not camera_agnostic
    for protocol in protocols:
        if protocol == "standard":
            per_query = _standard_reranked(rerank, unit_q, q_pids, q_camids, unit_g, g_pids, g_camids,
                                           camera_aware, camera_agnostic, normalize_centroids, chunk_bytes)
        else:
            raw_q, raw_g = (q_feats, g_feats) if raw_feats else (unit_q, unit_g)
            per_query = _original_per_query(raw_q, q_pids, q_camids, raw_g, g_pids, g_camids, camera_aware,
                                            protocol == "original", normalize_centroids, chunk_bytes,
                                            source_of=lambda q, g: _matrix_source(rerank(q, g)))
        result = _finish(per_query, max_rank, False, *labels)
        results[centroid_key(protocol, protocols)] = {**result, "protocol": protocol}
    return results


# ---------------------------------------------------------------------------------------------------
# CLI

def pixel_baseline_map(root, name="synthetic", size=(32, 16)):
    """mAP of nearest-neighbour retrieval on raw pixels (resized, L2-normalised, Euclidean): the floor a model
    must beat on a data set."""
    ds = read_dataset(name, root)

    def pixels(items):  # [N, h*w*3]
        x = np.stack([np.asarray(load_image(p).resize(size[::-1], Image.BILINEAR), np.float32).ravel()
                      for p, _, _ in items])
        return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    distmat = torch.cdist(pixels(ds["query"]), pixels(ds["gallery"]))
    (q_pids, q_camids), (g_pids, g_camids) = item_labels(ds["query"]), item_labels(ds["gallery"])
    return evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)["mAP"]


def evaluation_arguments(cfg, has_cameras):
    """evaluate_features keyword arguments from the configuration (train.py and evaluate.py alike)."""
    return {"keep_camid_centroids": cfg.MODEL.KEEP_CAMID_CENTROIDS and has_cameras,
            "max_rank": cfg.TEST.MAX_RANK, "camera_agnostic": cfg.TEST.CAMERA_AGNOSTIC,
            "normalize_centroids": cfg.TEST.FEAT_NORM, "centroid_protocol": cfg.TEST.CENTROID_PROTOCOL,
            "distance": cfg.SOLVER.DISTANCE_FUNC}


OPTIONS = [("visualize", ("--visualize",), "", "write ranked lists and the CMC curves as PNG files to DIR "
              "(as TEST.VISUALIZE yes does, into OUTPUT_DIR/visualize)"),
           ("report", ("--report",), "", "write the evaluation as one self-contained HTML page to FILE "
            "(as TEST.REPORT)"),
           ("report_limit", ("--report-limit",), "", "at most N queries in the page's ranked lists, the first ones "
            "(as TEST.REPORT_LIMIT; 0 = all)")]
REPORT_FLAGS = {"report": "TEST.REPORT", "report_limit": "TEST.REPORT_LIMIT"}
# the report ranks with the evaluator's own functions: report.py sits below this module, which writes reports
REPORT_EVALUATOR = Evaluator(squared_distances, identity_centroids, evaluate_rank, rerank_distances, PROTOCOL_NOTES)


def evaluate_checkpoint(cfg, checkpoint, given=(), visualize_dir=""):
    """Evaluate a checkpoint per image and per centroid on the first of DATASETS.NAMES; print the table. The input
    size and normalisation are the checkpoint's unless given (the configuration keys set on the command line)."""
    if not checkpoint:
        raise EvaluationError("no checkpoint to evaluate: give MODEL.PRETRAIN_PATH (or TEST.WEIGHT), "
                              "ours or an original .ckpt")
    device = utils.pick_device(cfg.MODEL.DEVICE)
    data = build_datasets(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, cfg.DATASETS.JSON_TRAIN_PATH)
    model = model_from_checkpoint(checkpoint).to(device)
    amp_dtype, _ = utils.amp_settings(device.type, cfg.USE_MIXED_PRECISION, cfg.SOLVER.AMP_DTYPE)
    cfg = checkpoint_inputs(cfg, model, given)
    size = cfg.INPUT.SIZE_TEST
    print(f"input size {size[0]}x{size[1]}, normalisation mean {_numbers(cfg.INPUT.PIXEL_MEAN)} "
          f"std {_numbers(cfg.INPUT.PIXEL_STD)}")
    results, (q_feats, g_feats) = evaluate_splits(model, data, cfg, device, amp_dtype, size=size)
    plain = None
    if cfg.TEST.RERANK:  # the same embeddings without re-ranking, for comparison
        plain = evaluate_features(q_feats, *item_labels(data["query"]), g_feats, *item_labels(data["gallery"]),
                                  raw_feats=True, **evaluation_arguments(cfg, data["has_cameras"]))
    write_config_report(cfg, data, (results, (q_feats, g_feats)), REPORT_EVALUATOR, checkpoint, plain)
    if cfg.TEST.FEAT_NORM:
        q_feats, g_feats = _normalize(q_feats), _normalize(g_feats)
    visualize_dir = visualize_dir or (os.path.join(cfg.OUTPUT_DIR, "visualize") if cfg.TEST.VISUALIZE == "yes" else "")
    if visualize_dir:
        limit = min(cfg.TEST.VISUALIZE_MAX_NUMBER, len(data["query"]))
        written = visualize_evaluation(q_feats.cpu(), data["query"], g_feats.cpu(), data["gallery"],
                                       visualize_dir, results, top_k=cfg.TEST.VISUALIZE_TOPK, limit=limit,
                                       camera_agnostic=cfg.TEST.CAMERA_AGNOSTIC)
        print(f"wrote {len(written)} pictures to {visualize_dir} (ranked lists of the first {limit} queries, cmc.png)")
    if not cfg.MODEL.USE_CENTROIDS:
        results, plain = {"image": results["image"]}, plain and {"image": plain["image"]}
    print(f"{data['name']}: {len(data['query'])} queries, {len(data['gallery'])} gallery images, "
          f"checkpoint {checkpoint}")
    if plain is not None:
        print(f"without re-ranking:\n{format_results(plain)}\nwith k-reciprocal re-ranking (k1 {cfg.TEST.RERANK_K1}, "
              f"k2 {cfg.TEST.RERANK_K2}, lambda {cfg.TEST.RERANK_LAMBDA}):")
    print(format_results(results))
    return results


def checkpoint_inputs(cfg, model, given=()):
    """cfg with INPUT.SIZE_TEST, PIXEL_MEAN and PIXEL_STD as the checkpoint's model recorded them (the size it was
    tested at, the normalisation it was trained with), except the keys in given (set on the command line)."""
    recorded = {"INPUT.SIZE_TEST": model.input_size, "INPUT.PIXEL_MEAN": getattr(model, "pixel_mean", None),
                "INPUT.PIXEL_STD": getattr(model, "pixel_std", None)}
    return cfg.replace({key: list(value) for key, value in recorded.items() if value and key not in given})


def _numbers(values):
    return " ".join(f"{v:g}" for v in values)


def evaluate_command(argv):
    """The evaluation command line: parse the configuration, evaluate the checkpoint, print; returns the results.
    Bad input raises UserError."""
    cfg, opts, given = config.parse_args(argv, OPTIONS, prog="evaluate.py")
    try:
        cfg = cfg.replace({key: config.coerce(key, opts[dest], f"--{dest.replace('_', '-')}")
                           for dest, key in REPORT_FLAGS.items() if opts[dest]})
    except config.ConfigError as err:
        raise EvaluationError(str(err)) from None
    return evaluate_checkpoint(cfg, cfg.TEST.WEIGHT or cfg.MODEL.PRETRAIN_PATH, given, opts["visualize"])


@utils.command
def main(argv=None):
    """`baseline ROOT`, or evaluate a checkpoint; returns the exit code (2 and one `error: ...` line for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["baseline"]:
        parser = argparse.ArgumentParser(prog="evaluate.py baseline", description="Raw-pixel nearest-neighbour mAP.")
        parser.add_argument("root", help="DATASETS.ROOT_DIR (the folder holding the data set, or the data set)")
        parser.add_argument("--dataset", default="synthetic", help="DATASETS.NAMES (default: synthetic)")
        opts = parser.parse_args(argv[1:])
        print(f"raw-pixel nearest-neighbour mAP: {100 * pixel_baseline_map(opts.root, opts.dataset):.1f}%")
        return 0
    evaluate_command(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
