"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017), vectorised torch on any device, within a few GB at Market-1501 size.

    dist = rerank_distances(q_feats, g_feats, k1=20, k2=6, lambda_value=0.3)      # [Q, G], smaller = closer

The probe and gallery items are pooled (N = Q + G) and every item gets a ranking over all N:
- d(i, j): squared Euclidean distance (metrics.squared_distances) divided by the largest d(i, .) of row i, as
  the authors' code does (their lambda_value=0.3, k1=20, k2=6 were tuned on this scale: d in [0, 1] like the
  Jaccard distance).
- N(i, k): the k + 1 nearest items of i, i itself first. R(i, k) = {j in N(i, k) : i in N(j, k)}.
- R*(i) = R(i, k1) plus every R(j, round(k1 / 2)) of a j in R(i, k1) that shares more than 2/3 of its
  items with R(i, k1) (the 1/2-expansion).
- V[i, j] = exp(-d(i, j)) / sum over m in R*(i) of exp(-d(i, m)) for j in R*(i), else 0.
- Local query expansion: V[i] <- the mean of V[j] over the k2 nearest items j of i (i included).
- d_J(i, j) = 1 - sum_m min(V[i, m], V[j, m]) / sum_m max(V[i, m], V[j, m]); d* = (1 - lambda) d_J + lambda d.

No [N, N] matrix is held: distances are computed in blocks (each pair once) keeping each row's nearest
items, its largest distance and the [Q, G] block; V is a list of (row, column, value) entries and the
Jaccard numerator a sum over the pairs of entries that share a column (a segment formulation).
"""
import torch

from support.metrics import pair_squared_distances, squared_distances, squared_norms
from support.utils import UserError

BLOCK_ROWS = 4096         # rows of a distance block: a 4096 x 4096 float32 block is 64 MiB
MAX_PAIRS = 1 << 23       # (query entry, gallery entry) pairs per Jaccard chunk: ~200 MiB of temporaries


class RerankError(UserError, ValueError):
    """Bad arguments to the re-ranking."""


def _check(q_feats, g_feats, k1, k2, lambda_value):
    """RerankError naming the argument and the fix."""
    if q_feats.dim() != 2 or g_feats.dim() != 2 or q_feats.shape[1] != g_feats.shape[1]:
        raise RerankError(f"re-ranking needs [Q, D] and [G, D] features, got {list(q_feats.shape)} and "
                          f"{list(g_feats.shape)}")
    if not len(q_feats) or not len(g_feats):
        raise RerankError(f"re-ranking needs at least one query and one gallery item, got {len(q_feats)} and "
                          f"{len(g_feats)}")
    if k1 < 1 or k2 < 1:
        raise RerankError(f"re-ranking k1={k1}, k2={k2}: both must be at least 1 (the paper uses 20 and 6)")
    if not 0 <= lambda_value <= 1:
        raise RerankError(f"re-ranking lambda_value={lambda_value}: choose a weight in [0, 1] (the paper uses 0.3)")


def _blocks(num_query, num):
    """Block bounds that split at num_query, so a block is all queries or all gallery items."""
    starts = list(range(0, num_query, BLOCK_ROWS)) + list(range(num_query, num, BLOCK_ROWS))
    return list(zip(starts, starts[1:] + [num]))


def _merge_nearest(best_d, best_i, dist, first_col):
    """Running top-`width` (smallest) of rows: the kept ones and those of a new block of columns from first_col."""
    width = best_d.shape[1]
    top_d, top_i = dist.topk(min(width, dist.shape[1]), dim=1, largest=False)  # the block's first, then a small merge
    all_d, all_i = torch.cat([best_d, top_d], 1), torch.cat([best_i, top_i + first_col], 1)
    best_d, order = all_d.topk(width, dim=1, largest=False)
    return best_d, all_i.gather(1, order)


def neighbours_and_distances(feats, num_query, width):
    """One pass over the pairs of feats [N, D]: each row's `width` nearest items, nearest first (squared distances
    [N, width], indices [N, width]), its largest squared distance [N], and the query-gallery block [Q, N - Q]."""
    num, device = len(feats), feats.device
    sq = squared_norms(feats)
    best_d = torch.full((num, width), float("inf"), device=device)
    best_i = torch.zeros(num, width, dtype=torch.int64, device=device)
    row_max = torch.zeros(num, device=device)
    qg = torch.empty(num_query, num - num_query, device=device)
    blocks = _blocks(num_query, num)
    for n, (a, b) in enumerate(blocks):
        for c, e in blocks[n:]:  # d is symmetric: each block pair once, used for its rows and its columns
            dist = squared_distances(feats[a:b], feats[c:e], sq[a:b], sq[c:e])
            if a == c:
                dist.fill_diagonal_(0)  # an item is its own nearest neighbour (rounding leaves ~1e-7)
            best_d[a:b], best_i[a:b] = _merge_nearest(best_d[a:b], best_i[a:b], dist, c)
            row_max[a:b] = torch.maximum(row_max[a:b], dist.amax(1))
            if a != c:
                best_d[c:e], best_i[c:e] = _merge_nearest(best_d[c:e], best_i[c:e], dist.T.contiguous(), a)
                row_max[c:e] = torch.maximum(row_max[c:e], dist.amax(0))
            if b <= num_query <= c:  # a query block against a gallery block
                qg[a:b, c - num_query:e - num_query] = dist
    return best_d, best_i, row_max, qg


def reciprocal_sets(nearest, k):
    """R(i, k) of every item: (candidates [N, k + 1] = N(i, k), mask [N, k + 1] of the k-reciprocal ones)."""
    forward = nearest[:, :k + 1]                                                  # [N, k+1]
    backward = nearest[forward, :k + 1]                                           # [N, k+1, k+1]
    items = torch.arange(len(nearest), device=nearest.device)
    return forward, (backward == items[:, None, None]).any(-1)


def expanded_sets(nearest, k1, chunk=4096):
    """R*(i) of every item as sorted (rows, cols) index lists: R(i, k1) plus the accepted R(j, k1/2)."""
    num = len(nearest)
    r1, m1 = reciprocal_sets(nearest, k1)
    rh, mh = reciprocal_sets(nearest, round(k1 / 2))  # Python's round, as the authors' code
    keys = []
    for start in range(0, num, chunk):
        cand, cand_ok = r1[start:start + chunk], m1[start:start + chunk]          # j in R(i, k1): [c, w1]
        half, half_ok = rh[cand], mh[cand] & cand_ok[..., None]                    # R(j, k1/2): [c, w1, wh]
        shared = ((half[..., None] == cand[:, None, None, :]) & cand_ok[:, None, None, :]).any(-1) & half_ok
        accept = cand_ok & (3 * shared.sum(-1) > 2 * half_ok.sum(-1))             # |shared| > 2/3 |R(j, k1/2)|
        members = torch.cat([cand, half.flatten(1)], 1)
        valid = torch.cat([cand_ok, (half_ok & accept[..., None]).flatten(1)], 1)
        rows = torch.arange(start, start + len(cand), device=nearest.device)[:, None].expand_as(members)
        keys.append(rows[valid] * num + members[valid])
    keys = torch.unique(torch.cat(keys))                                          # sorted: by row, then column
    return keys // num, keys % num


def pair_distances(feats, rows, cols, near_d, near_i, chunk=1 << 14):
    """Squared distances of the pairs (rows[p], cols[p]): looked up in the rows' nearest lists (nearly all of
    them), the rest computed from feats in chunks (a gather of 2 x chunk rows)."""
    found = near_i[rows] == cols[:, None]                                         # [P, width]
    out = near_d[rows, found.byte().argmax(1)]                                    # a column is listed at most once
    missing = torch.nonzero(~found.any(1))[:, 0]
    for s in range(0, len(missing), chunk):
        pairs = missing[s:s + chunk]
        out[pairs] = pair_squared_distances(feats[rows[pairs]], feats[cols[pairs]])  # as the blocks
    return out


def segment_positions(starts, lengths):
    """Elements of the segments [starts[e], starts[e] + lengths[e]): (segment e of each, its flat position)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(len(owner), device=lengths.device) - offsets[owner]
    return owner, starts[owner] + within


def row_starts(rows, num):
    """(start, length) of each row's run in a row-sorted entry list, for every row 0..num-1."""
    lengths = torch.bincount(rows, minlength=num)
    return torch.cumsum(lengths, 0) - lengths, lengths


def encode(dist, rows, row_max):
    """V: exp(-d(i, j) / max d(i, .)) over R*(i), each row summing to 1; values of the (rows, cols) entries
    given their squared distances."""
    weights = torch.exp(-dist / row_max[rows])
    return weights / torch.zeros_like(row_max).index_add_(0, rows, weights)[rows]


def query_expansion(rows, cols, values, nearest, k2):
    """V[i] <- mean of V[j] over the k2 nearest items j of i (i first): a new sorted (rows, cols, values)."""
    num, k2 = len(nearest), min(k2, nearest.shape[1])
    if k2 == 1:
        return rows, cols, values
    sources = nearest[:, :k2].reshape(-1)                                         # [N * k2]
    starts, lengths = row_starts(rows, num)
    owner, entry = segment_positions(starts[sources], lengths[sources])
    keys = torch.div(owner, k2, rounding_mode="floor") * num + cols[entry]
    keys, slot = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(keys), device=values.device).index_add_(0, slot, values[entry])
    return keys // num, keys % num, summed / k2


def shared_mass(rows, cols, values, num_query, num):
    """sum_m min(V[q, m], V[g, m]) for every query q and gallery item g: [Q, G], over the entry pairs that
    share a column m (a query entry meets each gallery entry of its column)."""
    order = torch.argsort(cols * num + rows)                                      # by column, then row
    rows, cols, values = rows[order], cols[order], values[order]
    is_query = rows < num_query
    q_rows, q_cols, q_vals = rows[is_query], cols[is_query], values[is_query]
    g_rows, g_cols, g_vals = rows[~is_query] - num_query, cols[~is_query], values[~is_query]
    g_start, g_len = row_starts(g_cols, num)                                      # each column's gallery run
    lengths = g_len[q_cols]
    ends = torch.cumsum(lengths, 0)
    out = torch.zeros(num_query * (num - num_query), device=values.device)
    first = 0
    while first < len(q_rows):  # chunks of query entries bringing at most MAX_PAIRS pairs (at least one entry)
        done = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(torch.searchsorted(ends, done + MAX_PAIRS, right=True)))
        owner, pos = segment_positions(g_start[q_cols[first:last]], lengths[first:last])
        owner += first
        out.index_add_(0, q_rows[owner] * (num - num_query) + g_rows[pos], torch.minimum(q_vals[owner], g_vals[pos]))
        first = last
    return out.view(num_query, num - num_query)


def rerank_distances(q_feats, g_feats, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranked distances [Q, G] (float32, on q_feats' device): (1 - lambda) d_J + lambda d."""
    _check(q_feats, g_feats, k1, k2, lambda_value)
    feats = torch.cat([q_feats.float(), g_feats.float().to(q_feats.device)])
    num, num_query = len(feats), len(q_feats)
    # 2 (k1 + 1) nearest: the distances of nearly every R* member are then at hand (99.99% on a Market-sized problem)
    near_d, nearest, row_max, qg = neighbours_and_distances(feats, num_query, min(max(2 * (k1 + 1), k2), num))
    row_max.clamp_(min=torch.finfo(torch.float32).tiny)  # all items identical: every distance is 0
    rows, cols = expanded_sets(nearest, k1)
    dist = pair_distances(feats, rows, cols, near_d, nearest)
    del near_d
    rows, cols, values = query_expansion(rows, cols, encode(dist, rows, row_max), nearest, k2)
    shared = shared_mass(rows, cols, values, num_query, num)
    total = torch.zeros(num, device=feats.device).index_add_(0, rows, values)  # 1 for every row (up to rounding)
    union = (total[:num_query, None] + total[None, num_query:]).sub_(shared)    # sum_m max = sum + sum - min
    jaccard = shared.div_(union).neg_().add_(1)
    del union
    return qg.div_(row_max[:num_query, None]).mul_(lambda_value).add_(jaccard, alpha=1 - lambda_value)
