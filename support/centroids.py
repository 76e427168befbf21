"""Centroid evaluation: single-image queries against per-identity gallery centroids, by one of three rules, plain or
k-reciprocal re-ranked; the per-image and per-centroid evaluation of embeddings; the centroid index of retrieve.py.

    results = evaluate_features(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids),
                                EvaluationOptions(centroid_protocol="all"))

The rules (PROTOCOL_NOTES, evaluate_centroids' docstring): "standard", the Market rule on centroids (the default);
"original", centroids-reid a1825b7's rule with its camera-index bug (the paper's table); "original_fixed", the same
with the index corrected. Every rule ranks with metrics.py's kernel: only the gallery of entries and the labels the
removal rule compares differ. old_per_camera_centroids is the rule used before the protocols: no protocol, kept as
bench.py's baseline and the tests' reference.
"""
import dataclasses
import functools
from typing import NamedTuple

import torch

from support.metrics import (
    CHUNK_BYTES,
    CameraRule,
    DistanceSource,
    EvaluationError,
    Split,
    check_distance,
    check_lengths,
    evaluate_feature_ranks,
    evaluate_rank,
    feature_source,
    l2_normalize,
    matrix_source,
    per_query_metrics,
    rank_labels,
    summarise_queries,
)
from support.rerank import rerank_distances

CENTROID_PROTOCOLS = ("standard", "original", "original_fixed")
PROTOCOL_NOTES = {
    "standard": "the Market rule on centroids: the query's identity from its gallery images of the other "
                "cameras, every other identity from all its images, distractors as single images",
    "original": "centroids-reid a1825b7's rule, its camera-index bug included (the paper's table)",
    "original_fixed": "centroids-reid a1825b7's rule with its camera index corrected",
}
RERANK_DEFAULTS = (20, 6, 0.3)  # k1, k2, lambda of Zhong et al. (TEST.RERANK_K1, _K2, _LAMBDA)


def check_protocol(centroid_protocol, allowed=CENTROID_PROTOCOLS):
    """Raise EvaluationError naming the valid protocols when centroid_protocol is not one of them."""
    if centroid_protocol not in allowed:
        raise EvaluationError(f"centroid_protocol {centroid_protocol!r} is unknown: choose one of "
                              f"{', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """How embeddings are evaluated; evaluate.evaluation_arguments builds it once from the configuration."""
    centroid_protocol: str = "standard"  # TEST.CENTROID_PROTOCOL: one of CENTROID_PROTOCOLS, or "all" (a row each)
    keep_camid_centroids: bool = True    # MODEL.KEEP_CAMID_CENTROIDS, on data with cameras
    normalize_centroids: bool = True     # TEST.FEAT_NORM: embeddings and centroids L2-normalised
    camera_agnostic: bool = False        # TEST.CAMERA_AGNOSTIC: nothing removed
    distance: str = "euclidean"          # SOLVER.DISTANCE_FUNC: euclidean or cosine
    max_rank: int = 50                   # TEST.MAX_RANK: length of the CMC curve
    rerank: tuple = None                 # (k1, k2, lambda) with TEST.RERANK: k-reciprocal re-ranked distances
    chunk_bytes: int = CHUNK_BYTES       # temporaries per chunk of the ranking (metrics.memory_plan)

    def __post_init__(self):
        check_protocol(self.centroid_protocol, CENTROID_PROTOCOLS + ("all",))
        check_distance(self.distance)

    @property
    def camera_aware(self):
        """A query's own identity leaves out the query's camera (cameras kept, not camera-agnostic)."""
        return self.keep_camid_centroids and not self.camera_agnostic

    @property
    def protocols(self):
        """The centroid rules evaluated, in row order."""
        return CENTROID_PROTOCOLS if self.centroid_protocol == "all" else (self.centroid_protocol,)

    @property
    def camera_rule(self):
        """The per-image removal rule (metrics.CameraRule)."""
        return CameraRule(agnostic=self.camera_agnostic)


# ---------------------------------------------------------------------------------------------------
# Identity sums, centroids and the other-cameras centroids

class Identities(NamedTuple):
    """A gallery's images grouped by pid: one index_add over the gallery serves every centroid."""
    pids: torch.Tensor     # [P] the gallery's pids, sorted (0 = distractors included)
    slots: torch.Tensor    # [N] each image's index in pids
    sums: torch.Tensor     # [P, D] embedding sums
    counts: torch.Tensor   # [P] images


def _group_sums(feats, groups, num_groups):
    """(sums [G, D], counts [G]) of feats' rows by group id 0..G-1; rows with id G are left out (no copy)."""
    sums = torch.zeros(num_groups + 1, feats.shape[1], device=feats.device).index_add_(0, groups, feats)
    return sums[:-1], torch.bincount(groups, minlength=num_groups + 1)[:-1]


def identities(gallery):
    """The Identities of a gallery Split of float32 embeddings and int64 labels (Split.on)."""
    pids, slots = torch.unique(gallery.pids, return_inverse=True)                  # [P], [N]
    return Identities(pids, slots, *_group_sums(gallery.feats, slots, len(pids)))


def identity_centroids(gallery, exclude_camid=None, normalize=True):
    """Mean embedding per identity (pid > 0) of a gallery Split, from its images of cameras != exclude_camid.

    Returns (centroids [P', D], pids [P']) for the identities that keep at least one image. One
    index_add over the gallery; excluded images go to a spare row that is dropped (no copy of feats).
    """
    g_feats = gallery.feats.float()
    g_pids = torch.as_tensor(gallery.pids).to(g_feats.device, torch.int64)
    pids, slot = torch.unique(g_pids, return_inverse=True)                         # [P], [N]
    if exclude_camid is not None:
        g_camids = torch.as_tensor(gallery.camids).to(g_feats.device, torch.int64)
        slot = slot.masked_fill(g_camids == exclude_camid, len(pids))
    sums, counts = _group_sums(g_feats, slot, len(pids))
    has_images = (counts > 0) & (pids > 0)  # pid 0 = distractors: never averaged into one "identity"
    centroids = sums[has_images] / counts[has_images, None]
    return (l2_normalize(centroids) if normalize else centroids), pids[has_images]


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


def _other_camera_means(g_feats, ids, g_cams, num_cams, pair_keys):
    """Per pair key = identity slot * num_cams + camera (sorted, unique): the mean of that identity's gallery
    images of the OTHER cameras [K, D], and how many they are [K] (0: none; the mean row is then 0).

    The identity's sum minus its sum on that camera: one index_add over the gallery serves all pairs."""
    if len(pair_keys) == 0:
        return g_feats.new_zeros(0, g_feats.shape[1]), ids.counts.new_zeros(0)
    g_keys = ids.slots * num_cams + g_cams                                         # [N]
    rows = torch.searchsorted(pair_keys, g_keys).clamp_(max=len(pair_keys) - 1)
    rows = torch.where(pair_keys[rows] == g_keys, rows, len(pair_keys))           # images of no pair: left out
    cam_sums, cam_counts = _group_sums(g_feats, rows, len(pair_keys))
    pair_slots = pair_keys // num_cams
    others = ids.counts[pair_slots] - cam_counts
    return (ids.sums[pair_slots] - cam_sums) / others.clamp(min=1)[:, None], others


def _camera_grid(gallery, ids, num_cams, g_cams):
    """Every identity's (pid > 0) centroid of its images outside camera c, for every camera code c in 0..num_cams-1
    for which it has such images: (keys [K] = identity slot * num_cams + c, sorted; means [K, D]; counts [K])."""
    slots = torch.nonzero(ids.pids > 0)[:, 0]
    keys = (slots[:, None] * num_cams + torch.arange(num_cams, device=slots.device)).reshape(-1)  # sorted
    means, others = _other_camera_means(gallery.feats, ids, g_cams, num_cams, keys)
    kept = others > 0
    return keys[kept], means[kept], others[kept]


def centroid_entries(gallery, camera_aware=False):
    """The centroids of a retrieval index (retrieve.py index --centroids): one L2-normalised mean per identity
    (pid > 0) of a gallery Split from all its images, then with camera_aware one per identity and gallery camera
    c >= 0 from the identity's images of the other cameras (where it has some), by camera, then pid.
    Returns (Split(feats [E, D], pids [E], camids [E]: the camera each leaves out, -1 none), counts [E])."""
    g = gallery.on(gallery.feats.device)
    ids = identities(g)
    named = ids.pids > 0
    parts = [(ids.sums[named] / ids.counts[named, None], ids.pids[named], torch.full_like(ids.pids[named], -1),
              ids.counts[named])]
    if camera_aware:
        cameras, g_cams = torch.unique(g.camids, return_inverse=True)
        keys, means, counts = _camera_grid(g, ids, len(cameras), g_cams)
        left_out, slots = cameras[keys % len(cameras)], keys // len(cameras)
        order = torch.argsort(left_out * len(ids.pids) + slots)
        order = order[left_out[order] >= 0]  # an unknown camera (-1) is no camera to leave out
        parts.append((means[order], ids.pids[slots[order]], left_out[order], counts[order]))
    feats, pids, left_out, counts = (torch.cat(column) for column in zip(*parts))
    return Split(l2_normalize(feats), pids, left_out), counts


# ---------------------------------------------------------------------------------------------------
# The standard rule

def _standard_gallery(query, gallery, camera_aware, normalize, no_camera):
    """The standard rule's gallery and, camera-aware, each query's own-identity centroid.

    Returns (entries, own): entries, a Split of one centroid per identity (pid > 0) from all its images, camid
    no_camera, then the distractor images as they are. own = (own_feats [K, D], q_own [Q]): one centroid of an
    identity's images from the cameras other than c per (identity, camera c) pair some query needs, and each
    query's row there (-1: its identity has no gallery image outside its camera, or none at all); None when not
    camera_aware.
    """
    ids = identities(gallery)
    is_identity = ids.pids > 0  # pid 0 = distractors: never averaged into one "identity"
    centroids = ids.sums[is_identity] / ids.counts[is_identity, None]
    distractors = gallery.pids == 0
    entries = Split(torch.cat([l2_normalize(centroids) if normalize else centroids, gallery.feats[distractors]]),
                    torch.cat([ids.pids[is_identity], gallery.pids[distractors]]),
                    torch.cat([torch.full_like(ids.pids[is_identity], no_camera), gallery.camids[distractors]]))
    if not camera_aware:
        return entries, None
    num_cams, q_cams, g_cams = _camera_codes(query.camids, gallery.camids)
    q_slots = _query_slots(query.pids, ids.pids)
    needs = (q_slots >= 0) & (query.pids > 0)
    keys, q_keys = torch.unique((q_slots * num_cams + q_cams)[needs], return_inverse=True)
    own, others = _other_camera_means(gallery.feats, ids, g_cams, num_cams, keys)
    q_own = torch.full_like(query.pids, -1)
    q_own[needs] = torch.where(others[q_keys] > 0, q_keys, -1)
    return entries, (l2_normalize(own) if normalize else own, q_own)


def _own_centroid_source(q_feats, entries, own, distance="euclidean"):
    """Distances to the standard gallery's entries, with each query's own-identity centroid (a column of an entry
    with pid > 0) replaced by its other-cameras centroid own_feats[q_own]. rank_true_matches asks pair distances
    only for true matches and masks all same-pid columns of the blocks, so the replacement happens in the pair
    distances alone: the blocks stay one matrix product."""
    own_feats, q_own = own
    num_centroids = int((entries.pids > 0).sum())
    source = feature_source(q_feats, entries.feats, distance)
    own_pairs = feature_source(q_feats, own_feats, distance).pairs

    def replaced(rows, cols):
        dist = source.pairs(rows, cols)
        mine = cols < num_centroids
        dist[mine] = own_pairs(rows[mine], q_own[rows[mine]])
        return dist
    return source._replace(pairs=replaced)


def _no_camera(query, gallery):
    """A camera id below every camera of query and gallery: the camid of entries that no camera removes."""
    return int(torch.cat([query.camids, gallery.camids]).min()) - 1 if len(query.camids) + len(gallery.camids) else -1


def _standard_per_query(query, gallery, options):
    """Per-query metrics of the standard rule (see evaluate_centroids) on Splits on one device."""
    no_camera = _no_camera(query, gallery)
    entries, own = _standard_gallery(query, gallery, options.camera_aware, options.normalize_centroids, no_camera)
    source, q_camids = feature_source(query.feats, entries.feats, options.distance), query.camids
    if own is not None:
        source = _own_centroid_source(query.feats, entries, own, options.distance)
        # a query without an other-cameras centroid shares its identity centroid's camera: that one is removed
        q_camids = torch.where((own[1] < 0) & (query.pids > 0), no_camera, q_camids)
    labels = rank_labels(query._replace(camids=q_camids), entries, query.feats.device, options.camera_rule)
    return per_query_metrics(source, labels, options.chunk_bytes)


# ---------------------------------------------------------------------------------------------------
# The original's rule

def _first_of_each(slots, sets):
    """Mask of the first row of every distinct (slot, set) pair."""
    if len(slots) == 0:
        return torch.zeros(0, dtype=torch.bool, device=slots.device)
    _, groups = torch.unique(torch.stack([slots, sets], 1), dim=0, return_inverse=True)
    rows = torch.arange(len(slots), device=slots.device)
    first = torch.full((int(groups.max()) + 1,), len(slots), device=slots.device).scatter_reduce_(
        0, groups, rows, "amin")
    return torch.zeros_like(slots, dtype=torch.bool).index_fill_(0, first, True)


def _original_gallery(query, gallery, camera_aware, index_bug, normalize):
    """The original's centroids: (Split(feats, pids, camera-set bit masks or None), query camera bits or None)."""
    if index_bug:  # its camids[inds]: gallery offsets read in [query camids, gallery camids]
        gallery = gallery._replace(camids=torch.cat([query.camids, gallery.camids])[:len(gallery.camids)])
    ids = identities(gallery)  # every gallery label, pid 0 included
    if not camera_aware:
        means = ids.sums / ids.counts[:, None]
        return Split(l2_normalize(means) if normalize else means, ids.pids, None), None
    num_cams, q_cams, g_cams = _camera_codes(query.camids, gallery.camids)
    if num_cams > 62:
        raise EvaluationError(f"centroid_protocol original: {num_cams} cameras, at most 62 are supported "
                              "(camera sets are int64 bit masks); evaluate camera-agnostically instead")
    bits = 1 << torch.arange(num_cams, device=gallery.feats.device)
    seen = torch.zeros(len(ids.pids), num_cams, dtype=torch.bool, device=gallery.feats.device)
    seen[ids.slots, g_cams] = True
    q_slots = _query_slots(query.pids, ids.pids)
    keys = torch.unique((q_slots * num_cams + q_cams)[q_slots >= 0])  # identity, then camera: its loop order
    slots, cams = keys // num_cams, keys % num_cams
    sets = (seen[slots] * bits).sum(1) & ~bits[cams]  # the cameras each centroid is made from
    keep = sets != 0  # no image outside that camera: no centroid
    keep[keep.clone()] = _first_of_each(slots[keep], sets[keep])  # a camera set seen before: dropped
    means, _ = _other_camera_means(gallery.feats, ids, g_cams, num_cams, keys[keep])
    return Split(l2_normalize(means) if normalize else means, ids.pids[slots[keep]], sets[keep]), bits[q_cams]


def _original_per_query(query, gallery, options, index_bug, source_of=None):
    """Per-query metrics of the original's rule (see evaluate_centroids); source_of(queries, gallery entries) gives
    the DistanceSource (default: from the features by options.distance; evaluate_reranked passes re-ranked ones)."""
    entries, q_bits = _original_gallery(query, gallery, options.camera_aware, index_bug, options.normalize_centroids)
    q_feats = l2_normalize(query.feats) if options.normalize_centroids else query.feats  # its R1_mAP.compute too
    source_of = source_of or functools.partial(feature_source, distance=options.distance)
    device = query.feats.device
    if not options.camera_aware:  # its dummy camids (queries 0, centroids 1): nothing is removed
        labels = rank_labels(query, entries._replace(camids=torch.zeros_like(entries.pids)), device,
                             CameraRule(agnostic=True))
    else:
        labels = rank_labels(query._replace(camids=q_bits), entries, device, CameraRule(sets=True))
    return per_query_metrics(source_of(q_feats, entries.feats), labels, options.chunk_bytes)


# ---------------------------------------------------------------------------------------------------
# Evaluations

def _unit(split):
    """The Split with L2-normalised float32 embeddings."""
    return split._replace(feats=l2_normalize(split.feats.float()))


def evaluate_centroids(query, gallery, options=None, raw_feats=False, return_per_query=False):
    """Single-image queries against per-identity gallery centroids by options.centroid_protocol, one of three rules;
    metrics as evaluate_rank's, with result["protocol"] = the rule. Every rule ranks by options.distance
    (SOLVER.DISTANCE_FUNC: cosine compares the L2-normalised query and centroid, so the centroids average the
    embeddings as given). query, gallery: Splits with embeddings; options: EvaluationOptions.

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
    options = options or EvaluationOptions()
    protocol = options.centroid_protocol
    check_protocol(protocol)  # "all" is for evaluate_features, which makes one row per rule
    check_lengths((len(query.feats), len(gallery.feats)), query, gallery)
    device = query.feats.device
    q, g = query.on(device), gallery.on(device)
    if protocol == "standard":
        if raw_feats and options.normalize_centroids:
            q, g = _unit(q), _unit(g)
        per_query = _standard_per_query(q, g, options)
    else:
        per_query = _original_per_query(q, g, options, protocol == "original")
    result = summarise_queries(per_query, query, gallery, options.max_rank, return_per_query)
    result["protocol"] = protocol
    return result


def centroid_key(protocol, protocols):
    """The results key of a protocol's centroid row: 'centroid' for the first, 'centroid_<protocol>' after."""
    return "centroid" if protocol == protocols[0] else f"centroid_{protocol}"


def evaluate_features(query, gallery, options=None, raw_feats=False):
    """Evaluate the embeddings of query and gallery Splits per image and per centroid: {'image': metrics,
    'centroid': metrics}, ranked by options.distance (SOLVER.DISTANCE_FUNC), re-ranked (evaluate_reranked)
    when options.rerank.

    options.centroid_protocol: one of CENTROID_PROTOCOLS (evaluate_centroids), or "all": then 'centroid'
    holds the standard row and 'centroid_original', 'centroid_original_fixed' the others (each row names its
    protocol in res['protocol']). raw_feats=True: the embeddings are raw; per-image and standard evaluation
    L2-normalise them first when options.normalize_centroids (TEST.FEAT_NORM), the original rules average
    them raw as the original did.
    """
    options = options or EvaluationOptions()
    if options.rerank is not None:
        return evaluate_reranked(query, gallery, options, raw_feats)
    unit_q, unit_g = (_unit(query), _unit(gallery)) if raw_feats and options.normalize_centroids else (query, gallery)
    results = {"image": evaluate_feature_ranks(unit_q, unit_g, options.max_rank, options.camera_agnostic,
                                               options.chunk_bytes, distance=options.distance)}
    for protocol in options.protocols:
        raw = raw_feats and protocol != "standard"
        results[centroid_key(protocol, options.protocols)] = evaluate_centroids(
            query if raw else unit_q, gallery if raw else unit_g,
            dataclasses.replace(options, centroid_protocol=protocol), raw_feats=raw)
    return results


# ---------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (rerank.py) per image and per centroid

def _other_camera_grid(query, gallery, normalize):
    """Each identity's centroid of its gallery images outside camera c, for EVERY camera c it has such images for
    (not only the pairs queries need: the re-ranking pool then owes nothing to the queries' identities), and each
    query's row there (-1: its identity has no gallery image outside its camera)."""
    ids = identities(gallery)
    num_cams, q_cams, g_cams = _camera_codes(query.camids, gallery.camids)
    keys, means, _ = _camera_grid(gallery, ids, num_cams, g_cams)
    q_slots = _query_slots(query.pids, ids.pids)
    q_keys = q_slots * num_cams + q_cams
    rows = torch.searchsorted(keys, q_keys).clamp_(max=max(len(keys) - 1, 0))
    found = ((q_slots >= 0) & (query.pids > 0) & (keys[rows] == q_keys) if len(keys)
             else torch.zeros_like(query.pids).bool())
    return (l2_normalize(means) if normalize else means), torch.where(found, rows, -1)


def _standard_reranked(rerank, query, gallery, options):
    """Per-query metrics of the standard rule on re-ranked distances. The pool holds the queries, the identity
    centroids, the distractor images and, camera-aware, every other-cameras centroid; a query's own identity then
    takes its other-cameras centroid's distance (as _own_centroid_source)."""
    no_camera = _no_camera(query, gallery)
    entries, _ = _standard_gallery(query, gallery, False, options.normalize_centroids, no_camera)
    device = query.feats.device
    if not options.camera_aware:
        labels = rank_labels(query, entries, device, options.camera_rule)
        return per_query_metrics(matrix_source(rerank(query.feats, entries.feats)), labels, options.chunk_bytes)
    own_feats, q_own = _other_camera_grid(query, gallery, options.normalize_centroids)
    dist = rerank(query.feats, torch.cat([entries.feats, own_feats]))
    num_centroids = int((entries.pids > 0).sum())

    def pairs(rows, cols):  # asked for true matches only: a centroid column is the query's own identity
        return dist[rows, torch.where(cols < num_centroids, len(entries.feats) + q_own[rows], cols)]
    q_camids = torch.where((q_own < 0) & (query.pids > 0), no_camera, query.camids)  # no such centroid: no match
    source = DistanceSource(matrix_source(dist).blocks, pairs, len(query.feats), len(entries.feats))
    labels = rank_labels(query._replace(camids=q_camids), entries, device, options.camera_rule)
    return per_query_metrics(source, labels, options.chunk_bytes)


def evaluate_reranked(query, gallery, options=None, raw_feats=False):
    """evaluate_features (same arguments, same result keys) on k-reciprocal re-ranked distances, with
    options.rerank = (k1, k2, lambda) or RERANK_DEFAULTS (cosine: of the L2-normalised embeddings).

    Per image the gallery images are re-ranked; per centroid the gallery of each centroid rule (its centroids,
    and its distractor images where the rule keeps them; for the camera-aware standard rule also every identity's
    other-cameras centroids), pooled with all queries as the paper's probes.
    """
    options = options or EvaluationOptions()
    k1, k2, lambda_value = options.rerank or RERANK_DEFAULTS
    device = query.feats.device
    q, g = query.on(device), gallery.on(device)
    unit_q, unit_g = (_unit(q), _unit(g)) if raw_feats and options.normalize_centroids else (q, g)

    def rerank(q_feats, g_feats):
        if options.distance == "cosine":  # re-ranked from cosine distances: those of the normalised embeddings
            q_feats, g_feats = l2_normalize(q_feats), l2_normalize(g_feats)
        return rerank_distances(q_feats, g_feats, k1, k2, lambda_value)
    results = {"image": evaluate_rank(rerank(unit_q.feats, unit_g.feats), q, g, options.max_rank,
                                      options.camera_agnostic, options.chunk_bytes)}
    for protocol in options.protocols:
        if protocol == "standard":
            per_query = _standard_reranked(rerank, unit_q, unit_g, options)
        else:
            per_query = _original_per_query(q if raw_feats else unit_q, g if raw_feats else unit_g, options,
                                            protocol == "original", lambda a, b: matrix_source(rerank(a, b)))
        result = summarise_queries(per_query, q, g, options.max_rank)
        results[centroid_key(protocol, options.protocols)] = {**result, "protocol": protocol}
    return results


# ---------------------------------------------------------------------------------------------------
# The rule before the protocols: bench.py's baseline, the tests' reference

def old_per_camera_centroids(query, gallery, max_rank=50):
    """The camera-aware centroid evaluation before issue #12: bench.py's centroids baseline, not a protocol.

    Its rule is wrong (neither Market's nor the original's): a query of camera c saw EVERY identity's centroid
    made without camera c. One gallery per query camera, each ranked by evaluate_feature_ranks.
    Returns mAP, cmc, num_valid_queries and num_skipped_queries."""
    q_feats, g_feats = query.feats, gallery.feats
    q_pids, q_camids = torch.as_tensor(query.pids).long(), torch.as_tensor(query.camids).long()
    g_pids = torch.as_tensor(gallery.pids).long().to(g_feats.device)
    g_camids = torch.as_tensor(gallery.camids).long().to(g_feats.device)
    distractors = g_pids == 0
    ap, first = torch.zeros(len(q_pids), dtype=torch.float64), torch.zeros(len(q_pids), dtype=torch.int64)
    valid = torch.zeros(len(q_pids), dtype=torch.bool)
    for camid in torch.unique(q_camids).tolist():
        rows = torch.nonzero(q_camids == camid)[:, 0]
        centroids, pids = identity_centroids(Split(g_feats, g_pids, g_camids), camid)
        c_feats = torch.cat([centroids, g_feats.float()[distractors]])
        c_pids = torch.cat([pids, g_pids[distractors]])
        c_camids = torch.cat([torch.full_like(pids, -1), g_camids[distractors]])
        try:
            part = evaluate_feature_ranks(Split(q_feats[rows.to(q_feats.device)], q_pids[rows], q_camids[rows]),
                                          Split(c_feats, c_pids, c_camids), max_rank,
                                          return_per_query=True)["per_query"]
        except EvaluationError:  # no query of this camera has a true match: all of them are skipped
            continue
        ap[rows], first[rows], valid[rows] = part["ap"].double(), part["first"].long(), part["num_matches"] > 0
    if not valid.any():
        raise EvaluationError("no query has a true match among the per-camera centroids")
    cmc = (first[valid][:, None] <= torch.arange(1, max_rank + 1)[None, :]).double().mean(0)
    return {"mAP": float(ap[valid].mean()), "cmc": cmc.numpy(), "num_valid_queries": int(valid.sum()),
            "num_skipped_queries": int((~valid).sum())}
