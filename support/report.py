"""The evaluation report: one self-contained HTML page a person opens from disk and browses after an evaluation.

    python evaluate.py --MODEL.PRETRAIN_PATH output/best.pth --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data \
        --report report.html          # or TEST.REPORT report.html (train.py rewrites it after every evaluation)

The page holds a header (checkpoint, data set, protocol, the metrics per image and per centroid), the CMC curves,
the histograms of positive and negative query-gallery distances with their overlap, every query's ranked lists
per image and per centroid side by side (filters: failures only, camera, identity; sorting by AP; pages) and a
per-identity table, worst first. Images are small JPEG thumbnails embedded as data URIs; the styles and the
script are inline and the text is ASCII: no network, no server, no framework.

The rankings are the evaluator's own: the page ranks with metrics.py's squared distance, removal rule and
evaluate_rank, centroids.py's identity centroids and rerank.py's re-ranking, so a query's AP and first true match
here are the ones the metrics count. The centroid lists follow the standard rule.
"""
import base64
import datetime
import html
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from support import utils
from support.centroids import PROTOCOL_NOTES, identity_centroids
from support.metrics import CameraRule, Split, evaluate_rank, pair_squared_distances, removed_items, squared_distances
from support.rerank import rerank_distances

THUMB = (64, 32)      # thumbnail height, width: a Market-1501 page of every query stays well under 60 MB
JPEG_QUALITY = 75
CHUNK_ROWS = 256      # queries per distance block: [256, 15913] float32 is 16 MB (its int64 keys 32 MB)
FINE_BINS = 4096      # histogram bins while counting; shown merged into SHOWN_BINS over the occupied range
SHOWN_BINS = 48
SAFE_INTEGER = 2**53  # larger pids (data.identity_pid of a folder name) are shown by their folder's name
PROTOCOL_TEXT = {
    False: "a query's gallery images of its own identity and camera are removed; a query left without a true "
           "match is skipped (Market-1501)",
    True: "camera-agnostic: nothing is removed (TEST.CAMERA_AGNOSTIC)",
}


class ReportError(utils.UserError):
    """The report cannot be written (a bad path, a full disk)."""


class Evaluation(NamedTuple):
    """One evaluation as the page shows it."""
    query: list             # (path, pid, camid) items
    gallery: list
    q_feats: torch.Tensor   # [Q, D] the embeddings evaluated (evaluate_splits': raw, normalised here per FEAT_NORM)
    g_feats: torch.Tensor   # [N, D]
    results: dict           # evaluate_features' (or evaluate_reranked's) results
    plain: dict = None      # the results without re-ranking, when `results` are re-ranked
    source: str = ""        # the checkpoint, or what the model is
    dataset: str = ""


class Settings(NamedTuple):
    """How the evaluation ranked (its keys) and what the page holds."""
    normalize: bool = True          # TEST.FEAT_NORM: embeddings and centroids L2-normalised
    camera_agnostic: bool = False   # TEST.CAMERA_AGNOSTIC: nothing removed
    camera_aware: bool = True       # MODEL.KEEP_CAMID_CENTROIDS on data with cameras, not camera-agnostic
    rerank: tuple = None            # (k1, k2, lambda) with TEST.RERANK
    centroids: bool = True          # MODEL.USE_CENTROIDS: the centroid lists
    top_k: int = 10                 # TEST.VISUALIZE_TOPK
    limit: int = 0                  # TEST.REPORT_LIMIT: the first `limit` queries in the lists; 0 = all
    thumb: tuple = THUMB


class Written(NamedTuple):
    """What write_report wrote."""
    path: str
    bytes: int
    seconds: float
    held: int    # queries in the ranked lists
    total: int   # queries evaluated


def settings_from_config(cfg, has_cameras):
    """The report's Settings from the configuration the evaluation ran with."""
    rerank = (cfg.TEST.RERANK_K1, cfg.TEST.RERANK_K2, cfg.TEST.RERANK_LAMBDA) if cfg.TEST.RERANK else None
    return Settings(normalize=cfg.TEST.FEAT_NORM, camera_agnostic=cfg.TEST.CAMERA_AGNOSTIC,
                    camera_aware=cfg.MODEL.KEEP_CAMID_CENTROIDS and has_cameras and not cfg.TEST.CAMERA_AGNOSTIC,
                    rerank=rerank, centroids=cfg.MODEL.USE_CENTROIDS, top_k=cfg.TEST.VISUALIZE_TOPK,
                    limit=cfg.TEST.REPORT_LIMIT)


def write_config_report(cfg, data, evaluated, checkpoint="", plain=None):
    """TEST.REPORT after an evaluation: evaluate.py's (checkpoint given: a page that cannot be written is an error)
    or train.py's per-epoch one (checkpoint '': a warning, and training goes on). evaluated = evaluate_splits'
    (results, (q_feats, g_feats)); nothing happens when TEST.REPORT is '' or on ranks other than 0. Returns
    the path written, or None."""
    results, feats = evaluated
    if not cfg.TEST.REPORT or results is None:
        return None
    if not cfg.MODEL.USE_CENTROIDS:  # as the printed table: per image only
        results, plain = {"image": results["image"]}, plain and {"image": plain["image"]}
    source = checkpoint or f"the model in training ({cfg.OUTPUT_DIR}) at its latest evaluation"
    evaluation = Evaluation(data["query"], data["gallery"], feats[0], feats[1], results, plain, source,
                            data.get("name", ""))
    try:
        written = write_report(cfg.TEST.REPORT, evaluation, settings_from_config(cfg, data["has_cameras"]))
    except ReportError as err:
        if checkpoint:
            raise
        print(f"warning: {err}; training goes on", file=sys.stderr, flush=True)
        return None
    cut = f" (the first {written.held} of {written.total} queries)" if written.held < written.total else ""
    print(f"wrote the report {written.path}: {written.bytes / 2**20:.1f} MiB, {written.held} queries{cut}, "
          f"{written.seconds:.1f} s", flush=True)
    return written.path


def write_report(path, evaluation, settings):
    """Build the page of an evaluation and write it to path in one rename; returns Written. ReportError when
    the file cannot be written."""
    start = time.perf_counter()
    page, held = build_page(evaluation, settings)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        utils.write_text_atomic(path, page)
    except OSError as err:
        raise ReportError(f"cannot write the report {path}: {err.strerror or err} (TEST.REPORT / --report "
                          "takes the path of an HTML file in a writable folder)") from None
    return Written(path, len(page), time.perf_counter() - start, held, len(evaluation.query))


# ---------------------------------------------------------------------------------------------------
# Rankings: the evaluator's order, a block of queries at a time

class Problem(NamedTuple):
    """An evaluation's tensors on one device: the embeddings as ranked (normalised per FEAT_NORM), the labels."""
    q_feats: torch.Tensor
    q_pids: torch.Tensor
    q_cams: torch.Tensor
    g_feats: torch.Tensor
    g_pids: torch.Tensor
    g_cams: torch.Tensor


class Source(NamedTuple):
    """One ranking's gallery of entries (gallery images, or centroids and distractors) and distances."""
    key: str
    title: str
    blocks: Callable        # (a, b) -> [b-a, M] the distances the evaluator ranks queries a..b by
    shown: Callable         # those distances -> the ones shown (Euclidean from squared)
    upper: float            # a bound of the shown distances
    entry_pids: torch.Tensor   # [M]
    entry_cams: torch.Tensor   # [M]
    q_cams: torch.Tensor       # [Q] the query cameras the removal rule compares (the evaluator's)
    own: tuple              # (own_col [Q], own_row [Q]): the entry shown for a query's own identity, or None
    describe: Callable      # entry rows [n] -> (gallery index of each one's thumbnail [n], labels)


class Ranking(NamedTuple):
    """What a ranking gives the page."""
    source: Source
    ap: torch.Tensor         # [Q] float64 AP, NaN for a query without a true match
    first: torch.Tensor      # [Q] int64 rank of the first true match, 0 for none
    top: torch.Tensor        # [H, k] entry rows of the held queries' top k, -1 past the kept entries
    dist: torch.Tensor       # [H, k] shown distances
    match: torch.Tensor      # [H, k] the entry is the query's identity
    histograms: tuple        # (positives, negatives) counts [FINE_BINS] over 0..source.upper


def order_keys(dist):
    """[n, M] distances -> int64 keys ordered like (float32 distance, column): the evaluator's order, ties by index."""
    bits = (dist.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie, as in the evaluator
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats order backwards as integers
    return (bits.to(torch.int64) << 32) | torch.arange(dist.shape[1], device=dist.device)



class Block(NamedTuple):
    """Queries a..b of a ranking: their distances [b-a, M] and which entries are their identity / removed."""
    a: int
    b: int
    dist: torch.Tensor
    same: torch.Tensor
    removed: torch.Tensor


def _block(source, q_pids, a, b, camera_agnostic):
    """Block of queries a..b: distances, same-identity and removed entries (same identity and camera)."""
    dist = source.blocks(a, b)                                                     # [b-a, M]
    q_pids, q_cams = q_pids[a:b, None], source.q_cams[a:b, None]
    removed = removed_items(q_pids, q_cams, source.entry_pids[None, :], source.entry_cams[None, :],
                            CameraRule(agnostic=camera_agnostic))
    return Block(a, b, dist, q_pids == source.entry_pids[None, :], removed)


def _histogram(values, upper):
    """Counts of values in FINE_BINS bins over 0..upper (float64, CPU)."""
    return torch.histc(values.float().clamp(0, upper), FINE_BINS, 0, upper).double().cpu()


def _block_metrics(source, block, q_pids, settings):
    """(query indices, AP, first true match) of the block's queries that have a true match, by the evaluator."""
    valid = (block.same & ~block.removed).any(1)
    if not bool(valid.any()):
        return None
    a, b = block.a, block.b
    query = Split(None, q_pids[a:b][valid], source.q_cams[a:b][valid])
    per_query = evaluate_rank(block.dist[valid], query, Split(None, source.entry_pids, source.entry_cams),
                              camera_agnostic=settings.camera_agnostic, return_per_query=True)["per_query"]
    return torch.nonzero(valid)[:, 0].cpu() + a, per_query["ap"].double().cpu(), per_query["first"].cpu()


def nearest_k(dist, k):
    """(columns [n, k], distances [n, k]) of each row's k smallest distances in the evaluator's order: by float32
    distance, ties by column. topk finds them; a row whose k-th distance ties with one left out is redone with
    exact (distance, column) keys."""
    values, cols = dist.topk(k, dim=1, largest=False)
    by_col = torch.argsort(cols, dim=1)                                             # ties by column ...
    cols, values = cols.gather(1, by_col), values.gather(1, by_col)
    by_value = torch.sort(values, dim=1, stable=True).indices                       # ... within each distance
    cols, values = cols.gather(1, by_value), values.gather(1, by_value)
    ties = torch.nonzero((dist <= values[:, -1:]).sum(1) > k)[:, 0]
    if len(ties):
        cols[ties] = order_keys(dist[ties]).topk(k, dim=1, largest=False).values & 0xFFFFFFFF
        values[ties] = dist[ties].gather(1, cols[ties])
    return cols, values


def _held_top(source, block, held, k):
    """(entry rows [n, k], shown distances [n, k], is the query's identity [n, k]) of the block's first n queries
    that the page holds: their k nearest kept entries in the evaluator's order, -1 past the kept ones; a query's
    own-identity column shows as its own entry (the standard rule's other-cameras centroid)."""
    n = min(block.b, held) - block.a
    masked = block.dist[:n].masked_fill(block.removed[:n], math.inf)
    cols, values = nearest_k(masked, min(k, masked.shape[1]))
    kept = values < math.inf
    rows = cols
    if source.own is not None:
        own_col, own_row = (x[block.a:block.a + n, None] for x in source.own)
        rows = torch.where((cols == own_col) & (own_row >= 0), masked.shape[1] + own_row, cols)
    match = block.same[:n].gather(1, cols) & kept
    return rows.masked_fill(~kept, -1).cpu(), source.shown(values).cpu(), match.cpu()


def rank_queries(source, q_pids, settings, held):
    """One ranking: every query's AP and first true match (the evaluator's), the histograms of its positive and
    negative distances, and the top k of the first `held` queries; CHUNK_ROWS queries at a time."""
    num_query = len(q_pids)
    aps = torch.full((num_query,), math.nan, dtype=torch.float64)
    firsts = torch.zeros(num_query, dtype=torch.int64)
    positives, negatives = torch.zeros(FINE_BINS, dtype=torch.float64), torch.zeros(FINE_BINS, dtype=torch.float64)
    tops = []
    for a in range(0, num_query, CHUNK_ROWS):
        block = _block(source, q_pids, a, min(a + CHUNK_ROWS, num_query), settings.camera_agnostic)
        shown = source.shown(block.dist)  # other identities: all pairs less the few of the query's identity
        positives += _histogram(shown[block.same & ~block.removed], source.upper)
        negatives += _histogram(shown, source.upper) - _histogram(shown[block.same], source.upper)
        del shown
        metrics = _block_metrics(source, block, q_pids, settings)
        if metrics is not None:
            index, ap, first = metrics
            aps[index], firsts[index] = ap, first
        if a < held:
            tops.append(_held_top(source, block, held, settings.top_k))
    if not tops:
        tops = [(torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool))]
    top, dist, match = (torch.cat([t[i] for t in tops]) for i in range(3))
    return Ranking(source, aps, firsts, top, dist, match, (positives, negatives))


# ---------------------------------------------------------------------------------------------------
# The two galleries: images, and the standard rule's centroids

def identity_label(path, pid):
    """How the page names an identity: its number, or the folder name of a named one; distractor, junk."""
    if pid == 0:
        return "distractor"
    if pid < 0:
        return "junk"
    return str(pid) if pid < SAFE_INTEGER else os.path.basename(os.path.dirname(path))


def camera_label(camid):
    """c1 for camera 0, as Market-1501's file names; '' for none."""
    return f"c{camid + 1}" if camid >= 0 else ""


def _two_part(identity, camera):
    """'12 c3' on one line; a longer identity ('distractor') and its camera on two."""
    return f"{identity}{' ' if len(identity) <= 5 else chr(10)}{camera}".strip()


def _distances(q_feats, g_feats, settings):
    """(blocks(a, b) -> [b-a, N] distances the evaluator ranks by, shown(d), a bound of the shown distances):
    squared Euclidean by the evaluator's formula (shown as Euclidean), or k-reciprocal re-ranked with all queries
    as the probes (shown as they are)."""
    if settings.rerank:
        full = rerank_distances(q_feats, g_feats, *settings.rerank)                     # [Q, N]
        return (lambda a, b: full[a:b].clone()), (lambda d: d), max(float(full.max()), 1e-6)

    def blocks(a, b):
        return squared_distances(q_feats[a:b], g_feats)
    upper = float(_norms(q_feats).max() + _norms(g_feats).max()) if len(q_feats) and len(g_feats) else 1.0
    return blocks, (lambda d: d.clamp(min=0).sqrt()), max(upper, 1e-6)


def _norms(feats):
    """L2 norm of each row [N]."""
    return torch.linalg.vector_norm(feats, dim=1)


def image_source(problem, settings, gallery):
    """The per-image ranking: the gallery images."""
    p = problem
    blocks, shown, upper = _distances(p.q_feats, p.g_feats, settings)
    labels = [_two_part(identity_label(path, pid), camera_label(camid)) for path, pid, camid in gallery]

    def describe(rows):
        return rows.tolist(), [labels[i] for i in rows.tolist()]
    return Source("image", "per image", blocks, shown, upper, p.g_pids, p.g_cams, p.q_cams, None, describe)


def _slots(sorted_keys, values):
    """Index of each value in sorted_keys; len(sorted_keys) where it is absent."""
    if len(sorted_keys) == 0:
        return torch.zeros_like(values)
    at = torch.searchsorted(sorted_keys, values.contiguous()).clamp_(max=len(sorted_keys) - 1)
    return torch.where(sorted_keys[at] == values, at, len(sorted_keys))


def nearest_members(dist, slots, num):
    """Per slot 0..num-1: the row with the smallest dist among the rows in that slot (ties: the first; -1: no row);
    rows of slot num are left out. The image a centroid tile shows."""
    rows = torch.arange(len(dist), device=dist.device)
    dist = dist.masked_fill(slots >= num, math.inf)
    best = torch.full((num + 1,), math.inf, device=dist.device).scatter_reduce(0, slots, dist, "amin")
    hit = (slots < num) & (dist == best[slots])
    first = torch.full((num + 1,), len(dist), device=dist.device).scatter_reduce(0, slots[hit], rows[hit], "amin")
    return torch.where(first[:num] < len(dist), first[:num], -1)


class Grid(NamedTuple):
    """Every identity's centroid of its gallery images outside camera c, for every camera c, in evaluate's order
    (identity, then camera): the camera-aware standard rule's own-identity centroids and re-ranking pool."""
    feats: torch.Tensor    # [K, D]
    pids: torch.Tensor     # [K]
    cams: torch.Tensor     # [K] the camera left out
    keys: torch.Tensor     # [K] sorted: identity slot * cameras + camera slot
    reps: torch.Tensor     # [K] the gallery image shown: the identity's image nearest its centroid, outside cam
    counts: torch.Tensor   # [K] images averaged


def other_camera_centroids(problem, normalize, members):
    """(Grid, the cameras of query and gallery sorted, the gallery pids sorted); members = (each gallery image's
    identity slot among the centroids' pids, its squared distance to that centroid, the centroids' pids)."""
    p = problem
    slots, dist, c_pids = members
    cams, gallery_pids = torch.unique(torch.cat([p.q_cams, p.g_cams])), torch.unique(p.g_pids)
    parts = []
    for code, cam in enumerate(cams.tolist()):
        feats, pids = identity_centroids(Split(p.g_feats, p.g_pids, p.g_cams), exclude_camid=cam, normalize=normalize)
        outside = slots.masked_fill(p.g_cams == cam, len(c_pids))
        at = _slots(c_pids, pids)                                                  # every pid has a centroid
        counts = torch.bincount(outside, minlength=len(c_pids) + 1)[at]
        reps = nearest_members(dist, outside, len(c_pids))[at]
        keys = _slots(gallery_pids, pids) * len(cams) + code
        parts.append((feats, pids, torch.full_like(pids, cam), keys, reps, counts))
    columns = [torch.cat(column) for column in zip(*parts)]
    order = torch.argsort(columns[3])
    return Grid(*(column[order] for column in columns)), cams, gallery_pids


def _own_entries(problem, c_pids, grid, cams, gallery_pids):
    """(own_col, own_row) of each query: its identity's centroid column and its other-cameras Grid row (-1: none)."""
    p = problem
    own_col = _slots(c_pids, p.q_pids)
    own_row = _slots(grid.keys, _slots(gallery_pids, p.q_pids) * len(cams) + _slots(cams, p.q_cams))
    return torch.where(own_col < len(c_pids), own_col, -1), torch.where(own_row < len(grid.keys), own_row, -1)


def _own_distances(q_feats, entries, grid, own, settings):
    """(blocks(a, b) over the centroid gallery's entries, shown, upper), each query's own-identity column holding
    its distance to its other-cameras centroid, as evaluate's standard rule: re-ranked, every other-cameras centroid
    joins the pool; else the own distance is one pair's (the evaluator's pair formula)."""
    if settings.rerank:
        pool_blocks, shown, upper = _distances(q_feats, torch.cat([entries, grid.feats]), settings)

        def own_values(a, b, rows, dist):
            return dist[rows, len(entries) + own[1][a:b][rows]]
    else:
        pool_blocks, shown, upper = _distances(q_feats, entries, settings)
        upper = max(upper, float(_norms(q_feats).max() + _norms(grid.feats).max()) if len(grid.feats) else 0)

        def own_values(a, b, rows, dist):
            return pair_squared_distances(q_feats[a:b][rows], grid.feats[own[1][a:b][rows]])

    def blocks(a, b):
        dist = pool_blocks(a, b)
        own_col, own_row = own[0][a:b], own[1][a:b]
        rows = torch.nonzero((own_col >= 0) & (own_row >= 0))[:, 0]
        dist[rows, own_col[rows]] = own_values(a, b, rows, dist)
        return dist[:, :len(entries)]
    return blocks, shown, upper


def centroid_source(problem, settings, gallery):
    """The per-centroid ranking by the standard rule (evaluate.evaluate_centroids): one centroid per identity from
    all its gallery images, the distractors as single images; camera-aware, a query's own identity is its
    centroid of the images outside the query's camera (none: that identity is removed for the query)."""
    p = problem
    centroids, c_pids = identity_centroids(Split(p.g_feats, p.g_pids, None), normalize=settings.normalize)
    c_slots = _slots(c_pids, p.g_pids)
    inside = c_slots < len(c_pids)
    dist = torch.full((len(c_slots),), math.inf, device=c_slots.device)
    dist[inside] = (p.g_feats[inside] - centroids[c_slots[inside]]).square().sum(1)
    reps = nearest_members(dist, c_slots, len(c_pids))
    distractors = torch.nonzero(p.g_pids == 0)[:, 0]
    no_camera = int(torch.cat([p.q_cams, p.g_cams]).min()) - 1
    entry_pids = torch.cat([c_pids, p.g_pids[distractors]])
    entry_cams = torch.cat([torch.full_like(c_pids, no_camera), p.g_cams[distractors]])
    entries, own, q_cams, grid = torch.cat([centroids, p.g_feats[distractors]]), None, p.q_cams, None
    if settings.camera_aware:
        grid, cams, gallery_pids = other_camera_centroids(p, settings.normalize, (c_slots, dist, c_pids))
        own = _own_entries(p, c_pids, grid, cams, gallery_pids)
        q_cams = torch.where((own[1] < 0) & (p.q_pids > 0), no_camera, p.q_cams)  # no such centroid: no true match
        blocks, shown, upper = _own_distances(p.q_feats, entries, grid, own, settings)
    else:
        blocks, shown, upper = _distances(p.q_feats, entries, settings)
    counts = torch.bincount(c_slots, minlength=len(c_pids) + 1)[:-1]
    describe = _centroid_describer(gallery, (c_pids, reps, counts), distractors, grid)
    return Source("centroid", "per centroid", blocks, shown, upper, entry_pids, entry_cams, q_cams, own, describe)


def _centroid_describer(gallery, centroids, distractors, grid):
    """describe(entry rows) of the centroid gallery: the image each shows and its label (identity x images;
    'not c2': the centroid of the images outside camera c2), lines apart by newlines."""
    c_pids, reps, counts = (x.tolist() for x in centroids)
    distractors = distractors.tolist()
    grid = [] if grid is None else list(zip(*(x.tolist() for x in (grid.pids, grid.cams, grid.reps, grid.counts))))

    def describe(rows):
        images, labels = [], []
        for row in rows.tolist():
            if row < len(c_pids):
                images.append(reps[row])
                labels.append(f"{identity_label(gallery[reps[row]][0], c_pids[row])} x{counts[row]}")
            elif row < len(c_pids) + len(distractors):
                images.append(distractors[row - len(c_pids)])
                labels.append(_two_part("distractor", camera_label(gallery[images[-1]][2])))
            else:
                pid, cam, rep, count = grid[row - len(c_pids) - len(distractors)]
                images.append(rep)
                labels.append(f"{identity_label(gallery[rep][0], pid)} x{count}\nnot {camera_label(cam)}")
        return images, labels
    return describe


# ---------------------------------------------------------------------------------------------------
# The page's data: thumbnails, the held queries' lists, the per-identity table

def thumbnail(path, size=THUMB):
    """Base64 JPEG of the image at path resized to size (h, w); a light grey tile when it cannot be read."""
    h, w = size
    try:
        with Image.open(path) as image:
            image.draft("RGB", (w, h))  # a JPEG decodes at a reduced scale: several times faster
            small = image.convert("RGB").resize((w, h), Image.BILINEAR)
    except (OSError, ValueError):
        small = Image.new("RGB", (w, h), (230, 230, 230))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rounded(values, digits=4):
    """A float tensor as a list for JSON: rounded, NaN -> None."""
    return [None if math.isnan(v) else round(v, digits) for v in values.tolist()]


def ranking_data(ranking, gallery, held, thumb_of):
    """The JSON of one ranking for the held queries: AP, first true match, top entries with distances and
    hits, and the entries they name (thumbnail, label, the shown image's file name)."""
    top = ranking.top
    kept = top >= 0
    used, local = torch.unique(top[kept], return_inverse=True)
    images, labels = ranking.source.describe(used)
    names = [os.path.basename(gallery[i][0]) for i in images]
    local_top = torch.full_like(top, -1)
    local_top[kept] = local
    lists = {"top": [], "dist": [], "match": []}
    for row, dists, hits in zip(local_top.tolist(), ranking.dist.tolist(), ranking.match.tolist()):
        width = sum(entry >= 0 for entry in row)  # the kept entries come first
        lists["top"].append(row[:width])
        lists["dist"].append([round(d, 4) for d in dists[:width]])
        lists["match"].append([int(hit) for hit in hits[:width]])
    return {"key": ranking.source.key, "title": ranking.source.title, "ap": _rounded(ranking.ap[:held]),
            "first": ranking.first[:held].tolist(), **lists,
            "entries": {"thumb": [thumb_of(i) for i in images], "label": labels, "name": names}}


def page_data(evaluation, rankings, held, size):
    """The page's JSON: the held queries (name, identity, camera, thumbnail), every ranking's lists and the
    thumbnails they use, each image once."""
    query = evaluation.query[:held]
    paths, thumb_index = [path for path, _, _ in query], {}

    def thumb_of(gallery_index):
        if gallery_index not in thumb_index:
            thumb_index[gallery_index] = len(paths)
            paths.append(evaluation.gallery[gallery_index][0])
        return thumb_index[gallery_index]
    lists = [ranking_data(ranking, evaluation.gallery, held, thumb_of) for ranking in rankings]
    queries = {"name": [os.path.basename(path) for path, _, _ in query],
               "id": [identity_label(path, pid) for path, pid, _ in query],
               "cam": [camera_label(camid) for _, _, camid in query], "thumb": list(range(held))}
    return {"queries": queries, "rankings": lists, "thumbs": [thumbnail(path, size) for path in paths]}


def identity_rows(evaluation, problem, rankings):
    """One row per query identity, worst per-image AP first: (label, queries, mean AP per ranking, rank-1 failures
    per ranking, gallery images, gallery cameras)."""
    q_pids, g_pids, g_cams = problem.q_pids.cpu(), problem.g_pids.cpu(), problem.g_cams.cpu()
    pids, slots = torch.unique(q_pids, return_inverse=True)
    queries = torch.bincount(slots, minlength=len(pids))
    means, failures = [], []
    for ranking in rankings:
        valid = ~torch.isnan(ranking.ap)
        sums = torch.zeros(len(pids), dtype=torch.float64).index_add_(0, slots[valid], ranking.ap[valid])
        means.append((sums / torch.bincount(slots[valid], minlength=len(pids))).tolist())  # 0/0: NaN
        failures.append(torch.bincount(slots[ranking.first > 1], minlength=len(pids)).tolist())
    g_slots = _slots(pids, g_pids)
    images = torch.bincount(g_slots, minlength=len(pids) + 1)[:-1].tolist()
    pairs = torch.unique(torch.stack([g_slots, g_cams], 1), dim=0)
    cameras = torch.bincount(pairs[:, 0], minlength=len(pids) + 1)[:-1].tolist()
    first_query = {}
    for path, pid, _ in evaluation.query:
        first_query.setdefault(pid, path)
    rows = [(identity_label(first_query[pid], pid), queries[i].item(), [m[i] for m in means],
             [f[i] for f in failures], images[i], cameras[i]) for i, pid in enumerate(pids.tolist())]
    return sorted(rows, key=lambda r: (math.isnan(r[2][0]), r[2][0]))  # no true match at all: last


# ---------------------------------------------------------------------------------------------------
# The page: header, charts, the queries' skeleton (the script fills it), identities

COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
HIT, MISS = "#00aa00", "#d71919"  # visualize.py's frame colours
METRIC_COLUMNS = (("mAP", "mAP %"), ("R1", "R1 %"), ("R5", "R5 %"), ("R10", "R10 %"), ("mINP", "mINP %"),
                  ("queries", "queries"))


def esc(text):
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def svg_chart(title, x_axis, y_axis, series, legend):
    """An inline SVG chart. x_axis, y_axis = (label, low, high, ticks [(value, text)]); series = [(points [(x, y)],
    colour, 'line' | 'dashed' | 'area')]; legend = [(text, colour)], one line each below the axes."""
    width, height, left, right, top, bottom = 400, 250, 54, 16, 28, 46
    total = height + 16 * len(legend)
    (x_label, x0, x1, x_ticks), (y_label, y0, y1, y_ticks) = x_axis, y_axis

    def sx(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" viewBox="0 0 {width} {total}">',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'class="frame"/>']
    for value, text in x_ticks:
        out.append(f'<line x1="{sx(value):.1f}" x2="{sx(value):.1f}" y1="{height - bottom}" y2="{height - bottom + 4}" '
                   f'class="tick"/><text x="{sx(value):.1f}" y="{height - bottom + 15}" text-anchor="middle">'
                   f'{esc(text)}</text>')
    for value, text in y_ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" class="grid"/>'
                   f'<text x="{left - 5}" y="{sy(value) + 4:.1f}" text-anchor="end">{esc(text)}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text transform="translate(13 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
               f'{esc(y_label)}</text>')
    for points, colour, style in series:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        if style == "area":
            out.append(f'<polygon points="{coords}" fill="{colour}" fill-opacity="0.3" stroke="{colour}"/>')
        else:
            dash = ' stroke-dasharray="5 3"' if style == "dashed" else ""
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>')
    for i, (text, colour) in enumerate(legend):
        y = height + 4 + 16 * i
        out.append(f'<rect x="{left}" y="{y}" width="14" height="8" fill="{colour}"/>'
                   f'<text x="{left + 20}" y="{y + 8}">{esc(text)}</text>')
    return "".join(out) + "</svg>"


def metric_rows(results):
    """[(results key, label, metrics)] of a results dict: per image first, then each centroid protocol."""
    rows = [("image", "per image", results["image"])] if results.get("image") is not None else []
    centroid = [(key, res) for key, res in results.items() if key.startswith("centroid") and res is not None]
    rows += [(key, f"centroid {res['protocol']}" if "protocol" in res else "centroid", res) for key, res in centroid]
    return rows


def metric_value(res, column):
    """One cell of the metrics table: a metric in % with 2 decimals (as evaluate.format_results), or a count."""
    if column == "queries":
        return str(res["num_valid_queries"])
    if column in ("mAP", "mINP"):
        return f"{100 * res[column]:.2f}"
    rank = int(column[1:])
    return f"{100 * res['cmc'][rank - 1]:.2f}" if rank <= len(res["cmc"]) else "-"


def metrics_table(results, caption, name):
    """The metrics of a results dict as an HTML table; cells carry data-metric, rows data-row (the results key)."""
    head = "".join(f"<th>{esc(text)}</th>" for _, text in METRIC_COLUMNS)
    rows = "".join(f'<tr data-row="{esc(key)}"><th>{esc(label)}</th>' + "".join(
        f'<td data-metric="{column}">{metric_value(res, column)}</td>' for column, _ in METRIC_COLUMNS) + "</tr>"
        for key, label, res in metric_rows(results))
    return (f'<table class="metrics" data-table="{name}"><caption>{esc(caption)}</caption>'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>")


def cmc_chart(results, plain):
    """The CMC curves of every metrics row (dashed: without re-ranking)."""
    curves = [(label, res, "line") for _, label, res in metric_rows(results)]
    if plain is not None:
        curves += [(f"{label}, without re-ranking", res, "dashed") for _, label, res in metric_rows(plain)]
    max_rank = max(len(res["cmc"]) for _, res, _ in curves)
    series, legend = [], []
    for i, (label, res, style) in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        series.append(([(r + 1, 100 * float(v)) for r, v in enumerate(res["cmc"])], colour, style))
        legend.append((f"{label}: R1 {100 * res['cmc'][0]:.1f}%, mAP {100 * res['mAP']:.1f}%", colour))
    step = 1 if max_rank <= 10 else 5 if max_rank <= 25 else 10
    x_ticks = [(r, str(r)) for r in sorted({1, *range(step, max_rank + 1, step)})]
    y_ticks = [(v, f"{v}%") for v in range(0, 101, 20)]
    return svg_chart("CMC: share of queries with a true match in the top r", ("rank r", 1, max(max_rank, 2), x_ticks),
                     ("queries", 0, 100, y_ticks), series, legend)


def histogram_chart(ranking, distance_name):
    """Histograms of one ranking's true-match and other-identity distances (shares of their pairs) and their
    overlap: the share of pairs both histograms hold, bin by bin."""
    positives, negatives = ranking.histograms
    occupied = torch.nonzero(positives + negatives)[:, 0]
    if len(occupied) == 0 or positives.sum() == 0 or negatives.sum() == 0:
        return f"<p>{esc(ranking.source.title)}: no true-match or no other-identity distances to show.</p>", 0.0
    low, high = int(occupied[0]), int(occupied[-1]) + 1
    group = max(1, math.ceil((high - low) / SHOWN_BINS))
    high = low + group * math.ceil((high - low) / group)
    fine = ranking.source.upper / FINE_BINS
    shares = []
    for counts in (positives, negatives):
        merged = torch.nn.functional.pad(counts, (0, max(0, high - FINE_BINS)))[low:high].view(-1, group).sum(1)
        shares.append(merged / merged.sum())
    overlap = 100 * float(torch.minimum(*shares).sum())
    edges = [(low + i * group) * fine for i in range(len(shares[0]) + 1)]
    series = []
    for share, colour in zip(shares, (HIT, MISS)):
        steps = [(edges[0], 0.0)] + [p for i, v in enumerate(share.tolist())
                                      for p in ((edges[i], 100 * v), (edges[i + 1], 100 * v))] + [(edges[-1], 0.0)]
        series.append((steps, colour, "area"))
    top = 100 * float(max(share.max() for share in shares))
    y_step = max(1, math.ceil(top / 5))
    x_ticks = [(edges[0] + (edges[-1] - edges[0]) * i / 4, f"{edges[0] + (edges[-1] - edges[0]) * i / 4:.3g}")
               for i in range(5)]
    legend = [(f"true matches: {int(positives.sum()):,} pairs", HIT),
              (f"other identities: {int(negatives.sum()):,} pairs", MISS)]
    chart = svg_chart(f"{ranking.source.title}: distances, overlap {overlap:.1f}%", (distance_name, edges[0],
                      edges[-1], x_ticks), ("share of pairs", 0, y_step * 5,
                      [(v, f"{v}%") for v in range(0, 5 * y_step + 1, y_step)]), series, legend)
    return chart, overlap


def _facts(evaluation, settings, held):
    """The header's facts: what was evaluated, how, what the page holds."""
    total, rerank = len(evaluation.query), settings.rerank
    embeddings = "L2-normalised embeddings" if settings.normalize else "embeddings as they are (TEST.FEAT_NORM false)"
    distances = (f"k-reciprocal re-ranked distances (k1 {rerank[0]}, k2 {rerank[1]}, lambda {rerank[2]}) of the "
                 f"{embeddings}, shown as they are" if rerank else
                 f"squared Euclidean distances of the {embeddings} order the lists; shown: Euclidean distances")
    rule = "standard: " + PROTOCOL_NOTES.get("standard", "")
    if not settings.camera_aware:
        rule = "standard, one centroid per identity from all its images (no camera exclusion), distractors as images"
    protocols = sorted({res["protocol"] for _, _, res in metric_rows(evaluation.results) if "protocol" in res})
    if protocols and protocols != ["standard"]:
        rule += "; the metrics' centroid rows: " + "; ".join(
            f"{name} = {PROTOCOL_NOTES.get(name, '')}" for name in protocols)
    holds = f"all {total:,} queries" if held == total else (
        f"the first {held:,} of {total:,} queries (--report-limit / TEST.REPORT_LIMIT); the metrics, curves, "
        f"histograms and the identity table cover all {total:,}")
    facts = [("checkpoint", evaluation.source or "-"),
             ("data set", f"{evaluation.dataset or '-'}: {total:,} queries, {len(evaluation.gallery):,} gallery "
                          "images"),
             ("protocol", PROTOCOL_TEXT[bool(settings.camera_agnostic)]), ("distances", distances)]
    facts += [("centroid lists", rule)] if settings.centroids else []
    facts += [("this page holds", holds), ("thumbnails", f"{settings.thumb[0]}x{settings.thumb[1]} JPEG"),
              ("written", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))]
    items = "".join(f"<dt>{esc(name)}</dt><dd>{esc(text)}</dd>" for name, text in facts)
    return f'<dl class="facts" data-held="{held}" data-total="{total}">{items}</dl>'


def _failure_lines(rankings):
    """Per ranking: how many queries have a wrong rank-1 (the failures) and how many have no true match."""
    items = []
    for ranking in rankings:
        failures, unmatched, total = int((ranking.first > 1).sum()), int((ranking.first == 0).sum()), len(ranking.ap)
        items.append(f'<li data-ranking="{ranking.source.key}" data-failures="{failures}" data-unmatched="{unmatched}">'
                     f"{esc(ranking.source.title)}: {failures:,} of {total:,} queries have a wrong rank-1 "
                     f"(failures); {unmatched:,} have no true match (not scored)</li>")
    return f'<ul class="failures">{"".join(items)}</ul>'


def header_html(evaluation, settings, rankings, held):
    """The header: facts, the metrics table(s), the failure counts."""
    if evaluation.plain is not None:
        k1, k2, lam = settings.rerank or ("?", "?", "?")
        tables = (metrics_table(evaluation.plain, "without re-ranking", "plain") +
                  metrics_table(evaluation.results, f"with k-reciprocal re-ranking (k1 {k1}, k2 {k2}, lambda {lam}):"
                                " the lists' order", "results"))
    else:
        tables = metrics_table(evaluation.results, "metrics (%; queries: those with a true match)", "results")
    return (f"<header><h1>Evaluation report</h1>{_facts(evaluation, settings, held)}"
            f'<div class="tables">{tables}</div>{_failure_lines(rankings)}</header>')


def charts_html(evaluation, settings, rankings):
    """The CMC curves and each ranking's distance histograms."""
    name = "re-ranked distance" if settings.rerank else "Euclidean distance"
    charts = [cmc_chart(evaluation.results, evaluation.plain)]
    for ranking in rankings:
        chart, overlap = histogram_chart(ranking, name)
        charts.append(f'<figure class="chart" data-overlap="{overlap:.2f}" data-ranking="{ranking.source.key}">'
                      f"{chart}</figure>")
    return (f'<section id="charts"><h2>Curves and distances</h2><div class="charts">{"".join(charts)}</div>'
            '<p class="note">Histograms: the distances of every query to its true matches (green) and to the other '
            "identities' entries (red), each as shares of its pairs; overlap = the share both hold, bin by bin.</p>"
            "</section>")


def _options(values, all_text):
    """<option>s: 'all', then the distinct values (numbers in numeric order)."""
    distinct = sorted(set(values), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    return f'<option value="">{esc(all_text)}</option>' + "".join(
        f'<option value="{esc(v)}">{esc(v)}</option>' for v in distinct if v)


def queries_html(data, settings):
    """The queries' controls and table; the script fills the rows from the page's JSON."""
    queries = data["queries"]
    rankings = "".join(f'<option value="{r["key"]}">{esc(r["title"])}</option>' for r in data["rankings"])
    heads = "".join(f"<th>{esc(r['title'])}: top {settings.top_k}</th>" for r in data["rankings"])
    return f"""<section id="queries"><h2>Queries</h2>
<p class="note">Each query, then its nearest gallery entries in order, framed green when they are its identity and red
when not, with their distance and identity. Centroid tiles show the image nearest the centroid; "x5": 5 images
averaged; "not c2": the centroid of the images outside the query's camera c2. A query's own-camera images of its
identity are left out, as the protocol does.</p>
<div class="controls">
<label><input type="checkbox" id="failures-only"> failures only (rank-1 wrong)</label>
<label>judged <select id="by">{rankings}</select></label>
<label>camera <select id="camera">{_options(queries["cam"], "all")}</select></label>
<label>identity <select id="identity">{_options(queries["id"], "all")}</select></label>
<label>sort <select id="sort"><option value="worst">AP, worst first</option><option value="best">AP, best first
</option><option value="order">data order</option></select></label>
<label>per page <select id="page-size"><option>25</option><option>50</option><option>100</option></select></label>
<button type="button" id="prev">&lt; previous</button><span id="page-text"></span>
<button type="button" id="next">next &gt;</button>
<span><b id="match-count" data-count="0">0</b> of {len(queries["name"]):,} queries shown match</span>
</div>
<table class="queries"><thead><tr><th>query</th>{heads}</tr></thead><tbody id="query-rows"></tbody></table>
<noscript><p>The ranked lists are drawn by the page's script: allow JavaScript for this file.</p></noscript>
</section>"""


def identities_html(identities, rankings):
    """The per-identity table, worst per-image AP first; a row click lists that identity's queries."""
    titles = [ranking.source.title for ranking in rankings]
    head = ("<th>identity</th><th>queries</th>" + "".join(f"<th>AP {esc(t)} %</th>" for t in titles) +
            "".join(f"<th>rank-1 wrong, {esc(t)}</th>" for t in titles) + "<th>gallery images</th><th>cameras</th>")
    rows = []
    for label, queries, means, failures, images, cameras in identities:
        aps = "".join(f"<td>{'-' if math.isnan(m) else f'{100 * m:.1f}'}</td>" for m in means)
        rows.append(f'<tr data-identity="{esc(label)}"><th>{esc(label)}</th><td>{queries}</td>{aps}'
                    + "".join(f"<td>{f}</td>" for f in failures) + f"<td>{images}</td><td>{cameras}</td></tr>")
    return (f'<section id="identities"><h2>Identities</h2><p class="note">AP per identity: the mean AP of its queries '
            f"that have a true match, worst first. A click on a row lists its queries above.</p>"
            f'<table class="identities"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 24px 48px;color:#222;background:#fff}
h1{font-size:22px;margin:18px 0 6px}h2{font-size:17px;margin:28px 0 8px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:6px 0 12px;max-width:1100px}
dl.facts dt{color:#666}dl.facts dd{margin:0}
.tables{display:flex;flex-wrap:wrap;gap:28px}
table{border-collapse:collapse}caption{text-align:left;color:#555;padding-bottom:3px}
.metrics th,.metrics td,.identities th,.identities td{padding:2px 10px;text-align:right;border-bottom:1px solid #e2e2e2}
.metrics tbody th,.identities tbody th{text-align:left}
ul.failures{margin:8px 0;padding-left:20px}
.charts{display:flex;flex-wrap:wrap;gap:18px}figure.chart{margin:0}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .title{font-size:12px;font-weight:600}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#e6e6e6}svg .tick{stroke:#999}
.note{color:#555;max-width:1100px}
.controls{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;padding:8px 10px;background:#f3f3f3;
position:sticky;top:0;z-index:1;border-bottom:1px solid #ddd}
table.queries td{vertical-align:top;padding:5px 8px;border-bottom:1px solid #e6e6e6}
table.queries th{text-align:left;padding:4px 8px}
.tiles{display:flex;gap:2px}
figure.tile{margin:0;width:50px;text-align:center;font-size:10px;line-height:1.25}
figure.tile img{display:block;margin:0 auto;width:32px;height:64px;border:3px solid #999}
figure.hit img{border-color:#00aa00}figure.miss img{border-color:#d71919}figure.query img{border-color:#282828}
figcaption{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.ap{font-size:12px;margin-bottom:3px}td.failed .ap{color:#d71919;font-weight:600}
td.query{width:96px}.qname{font-size:10px;color:#666;word-break:break-all}
table.identities tbody tr{cursor:pointer}table.identities tbody tr:hover{background:#f5f5ff}
"""

SCRIPT = """
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var Q = D.queries, count = Q.name.length, byKey = {};
  D.rankings.forEach(function (r) { byKey[r.key] = r; });
  var st = {by: D.rankings[0].key, failures: false, camera: "", identity: "", sort: "worst", page: 0, size: 25};
  function el(id) { return document.getElementById(id); }
  function esc(text) {
    return String(text).replace(/[&<>"]/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\"": "&quot;"}[c];
    });
  }
  function image(thumb) { return '<img alt="" src="data:image/jpeg;base64,' + D.thumbs[thumb] + '">'; }
  function failed(r, i) { return r.first[i] > 1; }
  function selected() {
    var r = byKey[st.by], rows = [];
    for (var i = 0; i < count; i++) {
      if ((st.failures && !failed(r, i)) || (st.camera && Q.cam[i] !== st.camera) ||
          (st.identity && Q.id[i] !== st.identity)) { continue; }
      rows.push(i);
    }
    if (st.sort !== "order") {
      var sign = st.sort === "worst" ? 1 : -1;
      rows.sort(function (a, b) {  // queries without a true match (no AP) last, either way
        var x = r.ap[a], y = r.ap[b];
        if (x === null || y === null) { return (x === null) - (y === null) || a - b; }
        return sign * (x - y) || a - b;
      });
    }
    return rows;
  }
  function tiles(r, i) {
    var out = "";
    for (var j = 0; j < r.top[i].length; j++) {
      var e = r.top[i][j], label = r.entries.label[e], d = r.dist[i][j].toFixed(3);
      out += '<figure class="tile ' + (r.match[i][j] ? "hit" : "miss") + '" title="' +
        esc("#" + (j + 1) + ": " + label.replace("\\n", " ") + ", distance " + d + ", " + r.entries.name[e]) + '">' +
        image(r.entries.thumb[e]) +
        "<figcaption>" + d + "<br>" + esc(label).split("\\n").join("<br>") + "</figcaption></figure>";
    }
    return out;
  }
  function cell(r, i) {
    var ap = r.ap[i] === null ? "no true match" : "AP " + (100 * r.ap[i]).toFixed(1) + "%";
    if (failed(r, i)) { ap += ", first true match #" + r.first[i]; }
    return '<td class="ranked' + (failed(r, i) ? " failed" : "") + '" data-ranking="' + r.key + '"><div class="ap">' +
      ap + '</div><div class="tiles">' + tiles(r, i) + "</div></td>";
  }
  function row(i) {
    return '<tr class="query-row" data-query="' + esc(Q.name[i]) + '"><td class="query"><figure class="tile query">' +
      image(Q.thumb[i]) + "<figcaption>" + esc(Q.id[i] + " " + Q.cam[i]) + '</figcaption></figure><div class="qname">' +
      esc(Q.name[i]) + "</div></td>" + D.rankings.map(function (r) { return cell(r, i); }).join("") + "</tr>";
  }
  function render() {
    var rows = selected(), pages = Math.max(1, Math.ceil(rows.length / st.size));
    st.page = Math.max(0, Math.min(st.page, pages - 1));
    el("query-rows").innerHTML = rows.slice(st.page * st.size, (st.page + 1) * st.size).map(row).join("");
    el("match-count").textContent = rows.length;
    el("match-count").setAttribute("data-count", rows.length);
    el("page-text").textContent = "page " + (st.page + 1) + " of " + pages;
    el("prev").disabled = st.page === 0;
    el("next").disabled = st.page >= pages - 1;
  }
  function bind(id, key, read) {
    el(id).addEventListener("change", function () { st[key] = read(el(id)); st.page = 0; render(); });
  }
  bind("failures-only", "failures", function (x) { return x.checked; });
  bind("by", "by", function (x) { return x.value; });
  bind("camera", "camera", function (x) { return x.value; });
  bind("identity", "identity", function (x) { return x.value; });
  bind("sort", "sort", function (x) { return x.value; });
  bind("page-size", "size", function (x) { return parseInt(x.value, 10); });
  el("prev").addEventListener("click", function () { st.page -= 1; render(); });
  el("next").addEventListener("click", function () { st.page += 1; render(); });
  Array.prototype.forEach.call(document.querySelectorAll("table.identities tbody tr"), function (tr) {
    tr.addEventListener("click", function () {
      st.identity = tr.getAttribute("data-identity");
      el("identity").value = st.identity;
      st.page = 0;
      render();
      el("queries").scrollIntoView();
    });
  });
  render();
}());
"""


def script_json(data):
    """JSON safe inside a <script> element: every '<' escaped, so no '</script>' or '<!--' can end it."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def render_page(evaluation, settings, rankings, data, identities):
    """The whole page as ASCII text (other characters as references or JSON escapes): no encoding can garble it."""
    held = len(data["queries"]["name"])
    title = f"Evaluation report: {evaluation.dataset or 'evaluation'}, {os.path.basename(evaluation.source or '')}"
    body = (header_html(evaluation, settings, rankings, held) + charts_html(evaluation, settings, rankings)
            + queries_html(data, settings) + identities_html(identities, rankings))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>\n'
            f'<body>{body}\n<script type="application/json" id="report-data">{script_json(data)}</script>\n'
            f"<script>{SCRIPT}</script>\n</body></html>\n")
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def problem_of(evaluation, settings):
    """The evaluation's tensors on the embeddings' device, normalised as evaluated."""
    device = evaluation.q_feats.device
    labels = [torch.as_tensor(np.array([(pid, camid) for _, pid, camid in items], dtype=np.int64).reshape(-1, 2),
                              device=device) for items in (evaluation.query, evaluation.gallery)]
    q_feats, g_feats = evaluation.q_feats.float(), evaluation.g_feats.float().to(device)
    if settings.normalize:
        q_feats, g_feats = torch.nn.functional.normalize(q_feats, dim=1), torch.nn.functional.normalize(g_feats, dim=1)
    return Problem(q_feats, labels[0][:, 0], labels[0][:, 1], g_feats, labels[1][:, 0], labels[1][:, 1])


def build_page(evaluation, settings):
    """(the report's HTML text, the number of queries its lists hold)."""
    total = len(evaluation.query)
    held = total if settings.limit <= 0 else min(settings.limit, total)
    with torch.inference_mode():
        problem = problem_of(evaluation, settings)
        sources = [image_source(problem, settings, evaluation.gallery)]
        if settings.centroids and evaluation.results.get("centroid") is not None:
            source = centroid_source(problem, settings, evaluation.gallery)
            if evaluation.results["centroid"].get("protocol", "standard") != "standard":  # the metrics' rule differs
                source = source._replace(title="per centroid (standard rule)")
            sources.append(source)
        rankings = [rank_queries(source, problem.q_pids, settings, held) for source in sources]
    data = page_data(evaluation, rankings, held, settings.thumb)
    return render_page(evaluation, settings, rankings, data,
                       identity_rows(evaluation, problem, rankings)), held
