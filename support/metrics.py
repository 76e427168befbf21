"""Retrieval metrics: mAP, CMC and mINP of ranked galleries, the rank kernel under them, and the squared distance.

    result = evaluate_rank(distmat, Split(None, q_pids, q_camids), Split(None, g_pids, g_camids))
    result = evaluate_feature_ranks(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids))

Protocol (Market-1501, as torchreid and fast-reid): for each query, gallery items with the same pid and
the same camera are removed; a query left without a true match is skipped and counted. Gallery items
are ranked by distance, ties by gallery index (what a stable argsort gives); distances are compared as
float32, like the peers' Cython evaluators. No row is sorted: only the ranks of each query's true
matches are needed, and they come from a histogram of where every gallery item falls among the
query's (few, sorted) true-match distances. The centroid rules (centroids.py) rank with the same kernel.
"""
import concurrent.futures
import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from support import utils

CHUNK_BYTES = 32 * 2**20  # temporaries per chunk (and worker); small chunks stay in cache, reuse the heap
BYTES_PER_ITEM = 16       # per (query, gallery item) of a chunk: at most 16 B live at once (distance and
                          # sign fix, int64 key, int32 position)
MIN_ROWS = 64             # below this many queries per chunk the gallery is split into blocks instead
GALLERY_BYTES_PER_ITEM = 48  # once per call: the gallery sorted by pid (+ sort buffers), squared norms
INT64_MAX = torch.iinfo(torch.int64).max
DISTANCES = ("euclidean", "cosine")  # SOLVER.DISTANCE_FUNC, as the original's utils/reid_metric.py ranks by it


class EvaluationError(utils.UserError, ValueError):
    """Bad evaluation input (shapes, NaN distances, no valid query); the CLI prints it without a traceback."""


class Split(NamedTuple):
    """One side of an evaluation, query or gallery: embeddings [N, D] (None where only the labels count, as
    beside a distance matrix), pids [N] (0: distractors) and camids [N]; labels as arrays, lists or tensors."""
    feats: torch.Tensor
    pids: object
    camids: object

    def labels_on(self, device):
        """(pids, camids) as int64 tensors on device."""
        return as_tensor(self.pids, device, torch.int64), as_tensor(self.camids, device, torch.int64)

    def on(self, device):
        """This split with float32 embeddings and int64 labels, all on device."""
        return Split(None if self.feats is None else self.feats.float().to(device), *self.labels_on(device))


def as_tensor(x, device, dtype=None):
    """numpy array / list / tensor -> tensor on device (no copy when it already is one)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.to(device=device, dtype=dtype or x.dtype)


def l2_normalize(x):
    """L2-normalise rows (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, dim=1)


# ---------------------------------------------------------------------------------------------------
# The squared distance, written once: the losses, the ranking, the re-ranking and the report use it

def squared_norms(x, differentiable=None):
    """[..., D] -> [...] squared L2 norms of the rows. Ranking: a reduction (vector_norm), no temporary the size of
    a large gallery; differentiable (default: x.requires_grad; the losses): x.pow(2).sum, as the losses always took
    it."""
    if x.requires_grad if differentiable is None else differentiable:
        return x.pow(2).sum(-1)
    return torch.linalg.vector_norm(x, dim=-1).square()


def squared_distances(x, y, x_sq=None, y_sq=None):
    """[..., M, D] x [..., N, D] -> [..., M, N] squared Euclidean distances |x|^2 + |y|^2 - 2 x.y, clamped at 0
    (rounding leaves some slightly below); x_sq, y_sq: the rows' squared_norms when at hand (reused across chunks).
    Differentiable: loss.py takes its Euclidean distance from it. One formula for the whole call, decided once:
    the losses' when either side needs a gradient, the ranking's otherwise."""
    differentiable = x.requires_grad or y.requires_grad
    x_sq = squared_norms(x, differentiable) if x_sq is None else x_sq            # [..., M]
    y_sq = squared_norms(y, differentiable) if y_sq is None else y_sq            # [..., N]
    dist = x_sq[..., :, None] + y_sq[..., None, :]
    if differentiable:  # the losses: the product apart, as autograd needs it
        dist = dist - 2 * x @ y.transpose(-1, -2)
    else:  # ranking: the product accumulated into dist in place, one [..., M, N] buffer (BLAS may round an ulp apart)
        (dist.addmm_ if dist.dim() == 2 else dist.baddbmm_)(x, y.transpose(-1, -2), alpha=-2)
    return dist.clamp_(min=0)


def pair_squared_distances(x, y, x_sq=None, y_sq=None):
    """[P, D] x [P, D] -> [P]: the squared distance of each row pair (x[p], y[p]), |x|^2 + |y|^2 - 2 x.y as in
    squared_distances (the same formula for both sides), the products summed row by row (a true match's distance,
    asked for a few pairs at a time)."""
    differentiable = x.requires_grad or y.requires_grad
    x_sq = squared_norms(x, differentiable) if x_sq is None else x_sq
    y_sq = squared_norms(y, differentiable) if y_sq is None else y_sq
    return (x_sq + y_sq - 2 * (x * y).sum(-1)).clamp_(min=0)


def check_distance(distance):
    """Raise EvaluationError naming the distances when `distance` is not one of them."""
    if distance not in DISTANCES:
        raise EvaluationError(f"distance {distance!r} is unknown (SOLVER.DISTANCE_FUNC): choose one of "
                              f"{', '.join(DISTANCES)}")


# ---------------------------------------------------------------------------------------------------
# Distance sources and the removal rule

class DistanceSource(NamedTuple):
    """The distances a ranking reads, num_query x num_gallery, never necessarily held whole."""
    blocks: Callable    # (a, b, c0, c1) -> [b-a, c1-c0] distances of queries a..b to gallery items c0..c1
    pairs: Callable     # (rows [T], cols [T]) -> [T] distances of single pairs (asked for true matches only)
    num_query: int
    num_gallery: int


def matrix_source(dist):
    """The DistanceSource of a [Q, N] distance matrix."""
    return DistanceSource(lambda a, b, c0, c1: dist[a:b, c0:c1], lambda rows, cols: dist[rows, cols], *dist.shape)


def feature_source(q_feats, g_feats, distance="euclidean"):
    """The DistanceSource of query/gallery embeddings (on q_feats' device), computed chunk by chunk. euclidean:
    squared Euclidean distances (the order of the original's get_euclidean); cosine: those of the L2-normalised
    rows, 2 - 2 cos, which rank as the original's get_cosine, 1 - cos."""
    q_feats, g_feats = q_feats.float(), g_feats.float().to(q_feats.device)
    if distance == "cosine":
        q_feats, g_feats = l2_normalize(q_feats), l2_normalize(g_feats)
    q_sq, g_sq = squared_norms(q_feats), squared_norms(g_feats)                   # [Q], [N]: reused by every chunk

    def blocks(a, b, c0, c1):
        return squared_distances(q_feats[a:b], g_feats[c0:c1], q_sq[a:b], g_sq[c0:c1])

    def pairs(rows, cols):
        return pair_squared_distances(q_feats[rows], g_feats[cols], q_sq[rows], g_sq[cols])
    return DistanceSource(blocks, pairs, len(q_feats), len(g_feats))


class CameraRule(NamedTuple):
    """Which same-identity gallery items a query does not see: those of its own camera (Market-1501); none when
    agnostic (single-camera data); with sets, query cameras are bits and gallery cameras bit masks of the cameras
    an entry is made from (the original's centroids), and an entry goes when it holds the query's bit."""
    agnostic: bool = False
    sets: bool = False


def removed_items(q_pids, q_camids, g_pids, g_camids, rule=None):
    """Which (query, gallery item) pairs the protocol removes (bool): the query's identity seen by its own camera,
    by rule (default: Market-1501's). Arguments broadcast: pair lists [T], or a grid [Q, 1] x [1, N]."""
    rule = rule or CameraRule()
    same = q_pids == g_pids
    if rule.agnostic:
        return torch.zeros_like(same)
    return same & ((g_camids & q_camids) != 0 if rule.sets else g_camids == q_camids)


class RankLabels(NamedTuple):
    """A ranking's labels, int64 on its device, and its removal rule."""
    q_pids: torch.Tensor     # [Q]
    q_camids: torch.Tensor   # [Q]
    g_pids: torch.Tensor     # [N]
    g_camids: torch.Tensor   # [N]
    by_pid: tuple            # gallery_by_pid(g_pids)
    rule: CameraRule


def rank_labels(query, gallery, device, rule=None):
    """The RankLabels of query and gallery Splits (their labels only) on device."""
    (q_pids, q_camids), (g_pids, g_camids) = query.labels_on(device), gallery.labels_on(device)
    return RankLabels(q_pids, q_camids, g_pids, g_camids, gallery_by_pid(g_pids), rule or CameraRule())


# ---------------------------------------------------------------------------------------------------
# Ranks of the true matches, one chunk of queries at a time

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


def _match_keys(source, labels, start, stop):
    """(sorted keys [Q, M] of each query's true matches, INT64_MAX past them; their counts [Q]; the rows and
    columns of all same-pid pairs) of queries start..stop. A same-pid item the rule removes is no match."""
    q_pids, q_camids = labels.q_pids[start:stop], labels.q_camids[start:stop]
    num_query, device = stop - start, q_pids.device
    rows, cols = _same_pid_pairs(q_pids, labels.by_pid)                            # few pairs per query
    is_match = ~removed_items(q_pids[rows], q_camids[rows], labels.g_pids[cols], labels.g_camids[cols], labels.rule)
    match_rows, match_cols = rows[is_match], cols[is_match]                        # row-major still
    num_matches = torch.bincount(match_rows, minlength=num_query)                  # [Q]
    width = max(int(num_matches.max()), 1) if num_query else 1
    slots = torch.arange(len(match_rows), device=device) - (torch.cumsum(num_matches, 0) - num_matches)[match_rows]
    match_keys = torch.full((num_query, width), INT64_MAX, dtype=torch.int64, device=device)
    match_keys[match_rows, slots] = _order_keys(source.pairs(match_rows + start, match_cols), match_cols)
    return match_keys.sort(1).values, num_matches, (rows, cols)                   # [Q, M], pads last


def rank_true_matches(source, labels, start, stop, block=None):
    """1-based ranks of the true matches of queries start..stop among their kept gallery items.

    source: a DistanceSource; labels: RankLabels on its device. A same-pid item is a true match unless
    labels.rule removes it (removed_items). The gallery is visited in blocks of `block` items, so memory
    does not grow with it. Returns (ranks [Q, M] int64, ascending per row, valid in the first
    num_matches[q] columns; num_matches [Q]).
    """
    match_keys, num_matches, (rows, cols) = _match_keys(source, labels, start, stop)
    num_query, width, device = stop - start, match_keys.shape[1], match_keys.device
    # counts[q, j] = how many of q's other-identity items fall between its true matches j-1 and j;
    # summed, plus the j matches themselves, that is the rank of match j. Same-identity items are left
    # out of the counts: the matches are counted by their sorted order, the rest are removed.
    counts = torch.zeros(num_query * (width + 1), dtype=torch.int64, device=device)
    row_offsets = torch.arange(num_query, device=device, dtype=torch.int32)[:, None] * (width + 1)
    block = block or source.num_gallery
    for c0 in range(0, source.num_gallery, block):
        c1 = min(c0 + block, source.num_gallery)
        keys = _order_keys(source.blocks(start, stop, c0, c1), torch.arange(c0, c1, device=device))
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


def per_query_metrics(source, labels, chunk_bytes=CHUNK_BYTES):
    """Per-query metrics (CPU tensors: ap, ap_trapezoid, inp, first, num_matches) of every query of a
    DistanceSource, ranked with RankLabels, chunk by chunk."""
    rows, block = _chunk_shape(source.num_gallery, chunk_bytes)

    def chunk(a):
        ranks, num_matches = rank_true_matches(source, labels, a, min(a + rows, source.num_query), block)
        return {k: v.cpu() for k, v in _query_metrics(ranks, num_matches).items()}

    starts = range(0, source.num_query, rows)
    workers = _workers(labels.q_pids.device, len(starts))
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


# ---------------------------------------------------------------------------------------------------
# Summaries and the public evaluations

def _no_valid_query_message(query, gallery):
    """Why no query kept a true match, and what to do about it."""
    q_pids, g_pids = _np(query.pids), _np(gallery.pids)
    if len(q_pids) == 0 or len(g_pids) == 0:
        return f"no query can be evaluated: {len(q_pids)} queries, {len(g_pids)} gallery items"
    if not np.isin(q_pids, g_pids).any():
        return ("no query identity appears in the gallery: check that query and gallery come from the same "
                "data set and keep its own pids")
    cams = np.union1d(np.unique(_np(query.camids)), np.unique(_np(gallery.camids)))
    return (f"no query has a true match in the gallery after removing same-identity images of the query's "
            f"camera (cameras seen: {cams.tolist()}): every matching gallery image comes from the query's "
            f"own camera" + (" - the data look like single-camera data" if len(cams) == 1 else "") +
            ". For data without distinct cameras evaluate camera-agnostically: evaluate_rank(..., "
            "camera_agnostic=True), or --TEST.CAMERA_AGNOSTIC true on the command line.")


def _np(x):
    """Tensor or array -> numpy array."""
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _mean_metrics(per_query, max_rank):
    """Mean metrics over valid queries; CMC from first-hit ranks (monotone, defined for short galleries)."""
    valid = per_query["num_matches"] > 0
    first = per_query["first"][valid]
    cmc = (first[:, None] <= torch.arange(1, max_rank + 1)[None, :]).double().mean(0)
    return {"mAP": float(per_query["ap"][valid].mean()), "mINP": float(per_query["inp"][valid].mean()),
            "mAP_trapezoid": float(per_query["ap_trapezoid"][valid].mean()), "cmc": cmc.numpy(),
            "num_valid_queries": int(valid.sum()), "num_skipped_queries": int((~valid).sum())}


def summarise_queries(per_query, query, gallery, max_rank=50, return_per_query=False):
    """The result of an evaluation from its per-query metrics (per_query_metrics'): mAP, mINP, the trapezoid mAP,
    the CMC up to max_rank and the query counts; EvaluationError saying why when no query (of the query and
    gallery Splits) has a true match."""
    if not bool((per_query["num_matches"] > 0).any()):
        raise EvaluationError(_no_valid_query_message(query, gallery))
    result = _mean_metrics(per_query, max_rank)
    if return_per_query:
        result["per_query"] = per_query
    return result


def check_lengths(shape, query, gallery):
    """Raise EvaluationError naming the label whose length disagrees with the [num_query, num_gallery] shape."""
    if len(shape) != 2:
        raise EvaluationError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(shape)}")
    for name, x, n in (("q_pids", query.pids, 0), ("q_camids", query.camids, 0), ("g_pids", gallery.pids, 1),
                       ("g_camids", gallery.camids, 1)):
        if len(x) != shape[n]:
            raise EvaluationError(f"{name} has {len(x)} entries but distmat has {shape[n]} "
                                  f"{'rows (queries)' if n == 0 else 'columns (gallery items)'}")


def evaluate_rank(distmat, query, gallery, max_rank=50, camera_agnostic=False, chunk_bytes=CHUNK_BYTES,
                  return_per_query=False):
    """mAP, mINP, CMC (and the Market-1501 trapezoid mAP) of a [num_query, num_gallery] distance matrix.

    query, gallery: label Splits (feats unused). The work runs on distmat's device (an array or a tensor).
    camera_agnostic=True removes nothing (single-camera data). Values are fractions in 0..1; raises
    EvaluationError when no query has a true match.
    """
    distmat = torch.as_tensor(distmat) if not torch.is_tensor(distmat) else distmat
    check_lengths(distmat.shape, query, gallery)
    labels = rank_labels(query, gallery, distmat.device, CameraRule(agnostic=camera_agnostic))
    per_query = per_query_metrics(matrix_source(distmat), labels, chunk_bytes)
    return summarise_queries(per_query, query, gallery, max_rank, return_per_query)


def evaluate_feature_ranks(query, gallery, max_rank=50, camera_agnostic=False, chunk_bytes=CHUNK_BYTES,
                           return_per_query=False, distance="euclidean"):
    """evaluate_rank on the embeddings of query and gallery Splits, distances computed chunk by chunk: no [Q, N]
    matrix is ever held; distance is SOLVER.DISTANCE_FUNC (euclidean or cosine)."""
    check_lengths((len(query.feats), len(gallery.feats)), query, gallery)
    check_distance(distance)
    source = feature_source(query.feats, gallery.feats, distance)  # before the labels' sort buffers: a lower peak
    labels = rank_labels(query, gallery, query.feats.device, CameraRule(agnostic=camera_agnostic))
    return summarise_queries(per_query_metrics(source, labels, chunk_bytes), query, gallery, max_rank,
                             return_per_query)
