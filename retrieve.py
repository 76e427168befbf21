"""Retrieval with a trained model: embed images, build a per-image or per-identity-centroid index, query it.

    python retrieve.py embed CKPT photos/ -o gallery.pt                  # <identity>/ sub-folders = labels
    python retrieve.py embed CKPT --dataset market1501 --root data --split gallery -o gallery.pt
    python retrieve.py index gallery.pt -o index.pt --centroids [--camera-aware]
    python retrieve.py query index.pt new_photos/ --checkpoint CKPT --top-k 5 --json out.json --visualize vis/
    python retrieve.py query index.pt query.pt --rerank                # k-reciprocal re-ranking of the entries
    python retrieve.py evaluate query.pt gallery.pt                    # evaluate.py's metrics from embeddings
    python bench.py --device cpu --stages search                       # gallery sizes and search times

Embeddings are the model's eval-mode BNNeck output, L2-normalised, so the (Euclidean) distance of two
images is sqrt(2 - 2 * cosine). Embeddings and index files are torch.save'd dicts of tensors, strings
and numbers (checkpoint.load reads them, weights_only) carrying the model's fingerprint: a query
embedded by another model than the index's is refused.
"""
import argparse
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

from data import IMAGE_EXTENSIONS, build_test_loader, camera_of, identity_pids, read_dataset
from evaluate import extract_features, format_results
from model import BACKBONE_EMB_SIZES, WeightError, model_from_checkpoint
from support import checkpoint, utils
from support.centroids import EvaluationOptions, centroid_entries, evaluate_features
from support.image_check import UnreadableImages
from support.metrics import Split
from support.rerank import rerank_distances
from support.specs import IMAGENET_MEAN, IMAGENET_STD, EmbedSpec
from visualize import draw_query_results

DEFAULT_SIZE = (256, 128)
SHARED = -2    # exclude_camids code: an entry every query sees (images, unlabelled images)
ALL_CAMS = -1  # exclude_camids code: a centroid of all of an identity's images
META_KEYS = ("fingerprint", "model_name", "feat_dim", "size", "flip", "checkpoint")


class RetrievalError(utils.UserError):
    """Bad input to a retrieval command; the CLI prints the message without a traceback."""


# ---------------------------------------------------------------------------------------------------
# The model and its fingerprint

def load_model(checkpoint, arch=None):
    """model_from_checkpoint in eval mode; RetrievalError when the file holds another architecture than arch."""
    try:
        model = model_from_checkpoint(checkpoint)
    except WeightError as err:
        raise RetrievalError(str(err)) from None
    if arch and model.name != arch:
        wanted = BACKBONE_EMB_SIZES.get(arch, "?")
        raise RetrievalError(f"{checkpoint} holds a {model.name} model ({model.feat_dim}-d embeddings), but "
                             f"--arch asks for {arch} ({wanted}-d): pass the {arch} checkpoint, or drop --arch")
    return model.eval()


def model_fingerprint(model):
    """'<name>-<dim>d-<hash>': sha256 of the architecture and every weight the embedding depends on."""
    digest = hashlib.sha256(f"{model.name}|{model.feat_dim}|{model.last_stride}|{model.stem_relu}".encode())
    for key, value in sorted(model.state_dict().items()):
        if key.startswith("classifier.") or key.endswith("num_batches_tracked"):
            continue  # neither changes the eval-mode embedding
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{model.name}-{model.feat_dim}d-{digest.hexdigest()[:12]}"


def input_size_for(model, size=None):
    """--size when given, else the input size the checkpoint was tested at, else 256x128."""
    return tuple(size or model.input_size or DEFAULT_SIZE)


def normalisation_of(model):
    """(pixel mean, pixel std) the checkpoint was trained with (INPUT.PIXEL_MEAN/STD), else ImageNet's."""
    return (getattr(model, "pixel_mean", None) or IMAGENET_MEAN), (getattr(model, "pixel_std", None) or IMAGENET_STD)


# ---------------------------------------------------------------------------------------------------
# Images to embed: folders (identity = first-level sub-folder), files, or a data set split

def collect_images(inputs):
    """Image files of files/folders -> [(path, identity name or '', camid)], sorted within each folder."""
    items = []
    for source in inputs:
        if os.path.isfile(source):
            if not source.lower().endswith(IMAGE_EXTENSIONS):
                raise RetrievalError(f"{source} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
            items.append((source, "", camera_of(source)))
            continue
        if not os.path.isdir(source):
            raise RetrievalError(f"{source}: no such file or folder")
        found = []
        for folder, subdirs, files in os.walk(source):
            subdirs.sort()
            relative = os.path.relpath(folder, source)
            identity = "" if relative == "." else relative.split(os.sep)[0]  # images at the top: no identity
            paths = [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
            found += [(path, identity, camera_of(path)) for path in paths]
        if not found:
            raise RetrievalError(f"{source} holds no images ({', '.join(IMAGE_EXTENSIONS)}), in it or in "
                                 f"its sub-folders")
        items += found
    return items


def dataset_images(name, root, split):
    """A data set split as [(path, identity name, camid)]: name str(pid); '' for query/gallery distractors
    (pid 0), while in train pid 0 is the first identity."""
    if split not in ("train", "query", "gallery"):
        raise RetrievalError(f"--split {split!r}: choose train, query or gallery")
    data = read_dataset(name, root)
    return [(path, str(pid) if pid > 0 or split == "train" else "", camid) for path, pid, camid in data[split]]


# ---------------------------------------------------------------------------------------------------
# Embedding

def unreadable_policy(skip_bad=False):
    """The UnreadableImages policy of the retrieval commands: --skip-bad leaves unreadable images out (listed in the
    output's "skipped"), else the first one stops the command."""
    return UnreadableImages(skip=bool(skip_bad), fix="pass --skip-bad")


def amp_dtype_for(device, fp32=False):
    """fp16 autocast on accelerators (fp32 on the CPU, or when asked), as train.py decides it."""
    return utils.amp_settings(device.type, not fp32, "fp16")[0]


def model_embed_spec(model, size=None, flip=False, batch_size=128, num_workers=0, amp_dtype=None):
    """The EmbedSpec of a model: its input size (input_size_for) and normalisation (normalisation_of), with how to
    batch, flip and autocast."""
    pixel_mean, pixel_std = normalisation_of(model)
    return EmbedSpec(input_size_for(model, size), batch_size, num_workers, bool(flip), amp_dtype, pixel_mean,
                     pixel_std)


def embed_chunks(model, items, device, spec, unreadable, chunk_batches=10):
    """Embed (path, identity, camid) items as an EmbedSpec says, in chunks of chunk_batches batches, reading them
    under an UnreadableImages policy; yields (feats [M, D], positions [M], positions of the images left out)."""
    batches = iter(build_test_loader(items, spec, unreadable))
    with tqdm(total=len(items), desc="embed", unit="img") as bar:
        while (first := next(batches, None)) is not None:
            chunk = itertools.chain([first], itertools.islice(batches, chunk_batches - 1))
            feats, positions, readable = extract_features(model, chunk, device, spec.flip, True, spec.amp_dtype)
            bar.update(len(positions))
            yield feats[torch.from_numpy(readable == 1)], positions[readable == 1], positions[readable == 0]


def _rows(feats, items, skipped, meta):
    """An embeddings dict of rows feats [M, D] for (path, identity, camid) items, and the skipped paths."""
    return {"kind": "embeddings", "feats": feats, "paths": [p for p, _, _ in items],
            "identities": [name for _, name, _ in items],
            "camids": torch.tensor([c for _, _, c in items], dtype=torch.int64), "skipped": list(skipped), **meta}


def _saved_parts(out, meta):
    """What earlier runs saved for out (the finished file, the chunks of an interrupted run); same model only."""
    paths = ([out] if os.path.exists(out) else []) + sorted(glob.glob(os.path.join(out + ".partial", "chunk_*.pt")))
    parts = [_load(path, "embeddings") for path in paths]
    for path, part in zip(paths, parts):
        for key in ("fingerprint", "size", "flip"):
            if part[key] != meta[key]:
                raise RetrievalError(f"{path} holds embeddings made with {key} {part[key]}, this run uses "
                                     f"{meta[key]}: delete it (and {out}.partial/) or pass another -o")
    return parts


def _merge(parts):
    """One complete embeddings dict from parts: each path once, pids from the identity names."""
    paths = [p for part in parts for p in part["paths"]]
    keep = sorted({p: i for i, p in reversed(list(enumerate(paths)))}.values())  # first copy of each path
    identities = [name for part in parts for name in part["identities"]]
    embedded = set(paths)
    skipped = list(dict.fromkeys(p for part in parts for p in part["skipped"] if p not in embedded))
    if not keep:
        raise RetrievalError(f"no image could be read ({len(skipped)} skipped): nothing to save")
    merged = {**parts[-1], "complete": True, "feats": torch.cat([part["feats"] for part in parts])[keep],
              "paths": [paths[i] for i in keep], "identities": [identities[i] for i in keep],
              "camids": torch.cat([part["camids"] for part in parts])[keep], "skipped": skipped}
    merged["pids"] = torch.tensor(identity_pids(merged["identities"]), dtype=torch.int64)
    return merged


def embed_to_file(model, items, out, device, spec, unreadable=None, save_every=10, checkpoint=""):
    """Embed items [(path, identity, camid)] into out as an EmbedSpec says, resumable: each chunk of save_every
    batches is saved to out.partial/ as it is done, and paths already saved (there or in out) are not embedded
    again. unreadable: an UnreadableImages policy (default: stop at the first)."""
    meta = {"fingerprint": model_fingerprint(model), "model_name": model.name, "feat_dim": model.feat_dim,
            "size": list(spec.size), "flip": bool(spec.flip), "checkpoint": str(checkpoint)}
    parts = _saved_parts(out, meta)
    done = {p for part in parts for p in part["paths"]}
    todo = [item for item in items if item[0] not in done]
    if done:
        print(f"{out}: {len(done)} images embedded by an earlier run, {len(todo)} to go")
    partial = out + ".partial"
    os.makedirs(partial, exist_ok=True)
    first_chunk = len(glob.glob(os.path.join(partial, "chunk_*.pt")))
    chunks = embed_chunks(model.to(device), todo, device, spec, unreadable or unreadable_policy(), save_every)
    for n, (feats, positions, bad) in enumerate(chunks):
        parts.append(_rows(feats, [todo[i] for i in positions], [todo[i][0] for i in bad], meta))
        utils.save_atomic(parts[-1], os.path.join(partial, f"chunk_{first_chunk + n:06d}.pt"))
    merged = _merge(parts)
    utils.save_atomic(merged, out)
    shutil.rmtree(partial, ignore_errors=True)  # after the merged file is in place: nothing is lost
    return merged


def embed_in_memory(model, items, device, spec, unreadable=None):
    """(feats [M, D], kept items, skipped paths) for a list of (path, identity, camid) items, embedded as an
    EmbedSpec says, read under an UnreadableImages policy (default: stop at the first)."""
    model = model.to(device)
    feats, kept, skipped = [], [], []
    for chunk_feats, positions, bad in embed_chunks(model, items, device, spec, unreadable or unreadable_policy()):
        feats.append(chunk_feats)
        kept += [items[i] for i in positions]
        skipped += [items[i][0] for i in bad]
    if not kept:
        raise RetrievalError(f"no image could be read ({len(skipped)} skipped)")
    return torch.cat(feats), kept, skipped


def _load(path, kind):
    """A retrieval file of the given kind ('embeddings' or 'index'), with a clear error otherwise."""
    if not os.path.isfile(path):
        raise RetrievalError(f"{path}: no such {kind} file")
    try:
        obj = checkpoint.load(path)
    except Exception as err:
        raise RetrievalError(f"{path}: not a retrieve.py {kind} file ({type(err).__name__})") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind", "unknown") if isinstance(obj, dict) else type(obj).__name__
        raise RetrievalError(f"{path} is a {found} file, expected {kind} (made by `retrieve.py "
                             f"{'embed' if kind == 'embeddings' else 'index'}`)")
    return obj


def load_embeddings(path):
    """An embeddings file written by `retrieve.py embed` (an interrupted run's is refused)."""
    if not os.path.exists(path) and os.path.isdir(path + ".partial"):
        raise RetrievalError(f"{path} is incomplete (an interrupted run left {path}.partial/): run the same "
                             f"`retrieve.py embed` command again to finish it")
    return _load(path, "embeddings")


def load_index(path):
    """An index file made by `retrieve.py index`."""
    return _load(path, "index")


# ---------------------------------------------------------------------------------------------------
# The index: one entry per image, or per identity centroid (optionally per identity and excluded camera)

def _centroid_index_entries(feats, pids, camids, camera_aware):
    """Centroid entries by centroids.centroid_entries, each with the first of its member images (the one shown)."""
    entries, counts = centroid_entries(Split(feats, pids, camids), camera_aware)
    first = torch.empty_like(entries.pids)
    for code in torch.unique(entries.camids).tolist():  # the all-camera entries (ALL_CAMS), then each camera's
        at = torch.nonzero(entries.camids == code)[:, 0]                           # sorted by pid
        member = pids > 0
        if code != ALL_CAMS:
            member &= camids != code
        rows = torch.nonzero(member)[:, 0]                                         # [M] member images
        slot = torch.searchsorted(entries.pids[at], pids[rows])                    # [M] -> entry
        first[at] = torch.full((len(at),), len(pids)).scatter_reduce_(0, slot, rows, "amin")
    return {"feats": entries.feats, "pids": entries.pids, "camids": torch.full_like(entries.pids, -1),
            "image": first, "counts": counts, "exclude_camids": entries.camids}


def _image_entries(feats, pids, camids, rows):
    """One entry per image of rows, seen by every query."""
    return {"feats": feats[rows], "pids": pids[rows], "camids": camids[rows], "image": rows,
            "counts": torch.ones_like(rows), "exclude_camids": torch.full_like(rows, SHARED)}


def build_index(feats, pids, camids, centroids=False, camera_aware=False):
    """Index entries {feats [E, D], pids, camids, image (a member image), counts, exclude_camids}.

    Per image: one entry per image. With centroids: one L2-normalised mean per identity (pid > 0),
    and unlabelled images (pid 0) stay single entries, as the evaluator does with distractors. With
    camera_aware too: in addition one centroid per (identity, camera c) made of the identity's images
    from cameras other than c; a query from camera c searches those alone: a cross-camera search, in
    which no identity's centroid holds an image of the query's camera (not the evaluation's standard
    rule, which leaves that camera out of the query's own identity only: `retrieve.py evaluate`).
    The centroids are centroids.centroid_entries'.
    """
    pids, camids = torch.as_tensor(pids, dtype=torch.int64), torch.as_tensor(camids, dtype=torch.int64)
    if camera_aware and not centroids:
        raise RetrievalError("--camera-aware builds camera-aware centroids: add --centroids")
    if not centroids:
        return _image_entries(feats, pids, camids, torch.arange(len(pids)))
    if not bool((pids > 0).any()):
        raise RetrievalError("no image has an identity, so there is nothing to average: put the images in "
                             "<identity>/ sub-folders, or embed a data set with --dataset")
    if camera_aware and not bool((camids >= 0).any()):
        raise RetrievalError("--camera-aware needs camera ids (`_c<N>` in the file names, or a data set "
                             "with cameras); these images have none")
    parts = [_centroid_index_entries(feats, pids, camids, camera_aware),
             _image_entries(feats, pids, camids, torch.nonzero(pids == 0)[:, 0])]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def index_from_embeddings(emb, centroids=False, camera_aware=False, source=""):
    """An index file's dict: build_index entries plus paths, identity names and the model's metadata."""
    entries = build_index(emb["feats"], emb["pids"], emb["camids"], centroids, camera_aware)
    name_of = dict(zip(emb["pids"].tolist(), emb["identities"]))
    return {"kind": "index", "entry": "centroid" if centroids else "image", "camera_aware": bool(camera_aware),
            **entries, "paths": [emb["paths"][i] for i in entries["image"].tolist()],
            "identities": [name_of.get(p, "") for p in entries["pids"].tolist()], "source": str(source),
            **{k: emb[k] for k in META_KEYS}}


def describe_index(index):
    """'E entries (P identity centroids + U unlabelled images), D-d, X MiB'."""
    kinds = {"centroid": (index["exclude_camids"] != SHARED).sum().item(),
             "image": (index["exclude_camids"] == SHARED).sum().item()}
    size = f"{index['feats'].shape[1]}-d, {index['feats'].numel() * 4 / 2**20:.1f} MiB"
    if index["entry"] == "image":
        return f"{len(index['pids'])} image entries, {size}"
    aware = " (one per identity and excluded camera, plus all-camera ones)" if index["camera_aware"] else ""
    return (f"{len(index['pids'])} entries: {kinds['centroid']} identity centroids{aware} + {kinds['image']} "
            f"unlabelled images, {size}")


# ---------------------------------------------------------------------------------------------------
# Search

def search_exact(q_feats, g_feats, k, chunk=2**18):
    """Top-k gallery rows by inner product (= smallest distance for unit vectors): (sims [Q, k], idx [Q, k]).

    One matrix product per gallery chunk, a running top-k merged across chunks (bounded memory).
    """
    best_sims = q_feats.new_zeros(len(q_feats), 0)
    best_idx = torch.zeros(len(q_feats), 0, dtype=torch.int64, device=q_feats.device)
    for start in range(0, len(g_feats), chunk):
        sims = q_feats @ g_feats[start:start + chunk].T                           # [Q, C]
        top_sims, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
        best_sims, best_idx = torch.cat([best_sims, top_sims], 1), torch.cat([best_idx, top_idx + start], 1)
        best_sims, order = best_sims.topk(min(k, best_sims.shape[1]), dim=1)
        best_idx = best_idx.gather(1, order)
    return best_sims, best_idx


def import_faiss():
    """The faiss module, or a RetrievalError saying how to install the optional dependency."""
    try:
        import faiss
        return faiss
    except ImportError:
        raise RetrievalError("--backend faiss needs the optional package faiss-cpu: pip install faiss-cpu "
                             "(or use the default exact backend)") from None


def search_faiss(q_feats, g_feats, k):
    """Top-k by inner product with faiss' exact IndexFlatIP: (sims [Q, k], idx [Q, k]) CPU tensors."""
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(g_feats.shape[1])
    flat.add(np.ascontiguousarray(g_feats.float().cpu().numpy()))
    sims, idx = flat.search(np.ascontiguousarray(q_feats.float().cpu().numpy()), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def query_groups(index, q_camids):
    """Which centroids each query searches: its camera when the index has centroids without that camera, else
    ALL_CAMS. [Q]"""
    cameras = torch.unique(index["exclude_camids"][index["exclude_camids"] >= 0])
    q_camids = torch.as_tensor(q_camids, dtype=torch.int64)
    return torch.where(torch.isin(q_camids, cameras), q_camids, torch.full_like(q_camids, ALL_CAMS))


def search_index(index, q_feats, q_camids, k=5, backend="torch", device="cpu", rerank=None):
    """(distances [Q, k], entry indices [Q, k]); -1 / nan pad when a query's group has fewer than k entries.

    rerank: None, or rerank_distances' keywords (k1, k2, lambda_value): each group's entries are then ranked by
    k-reciprocal re-ranked distances, all queries pooled with them as the paper's probes, and those are returned.
    """
    if rerank is not None and backend != "torch":
        raise RetrievalError("--rerank computes every query-entry distance with torch: drop --backend faiss")
    groups = query_groups(index, q_camids)
    dist = torch.full((len(q_feats), k), float("nan"))
    idx = torch.full((len(q_feats), k), -1, dtype=torch.int64)
    for group in torch.unique(groups).tolist():  # a loop over query cameras (few), each one batched
        rows = torch.nonzero(groups == group)[:, 0]
        entries = torch.nonzero((index["exclude_camids"] == group) | (index["exclude_camids"] == SHARED))[:, 0]
        width = min(k, len(entries))
        if rerank is not None:
            g_feats = index["feats"][entries].float().to(device)
            reranked = rerank_distances(q_feats.float().to(device), g_feats, **rerank)[rows.to(device)]
            top, found = reranked.topk(width, dim=1, largest=False)
            dist[rows, :width], idx[rows, :width] = top.cpu(), entries[found.cpu()]
            continue
        if backend == "faiss":
            sims, found = search_faiss(q_feats[rows], index["feats"][entries], width)
        elif backend == "torch":
            g_feats = index["feats"][entries].float().to(device)
            sims, found = search_exact(q_feats[rows].float().to(device), g_feats, width)
        else:
            raise RetrievalError(f"--backend {backend!r}: choose torch (exact, default) or faiss")
        # unit vectors: |q - g|^2 = 2 - 2 q.g
        dist[rows, :width] = (2 - 2 * sims.float().cpu()).clamp(min=0).sqrt()
        idx[rows, :width] = entries[found.cpu()]
    return dist, idx


def query_results(index, q_items, dist, idx):
    """[{query, identity, camid, results: [{rank, identity, distance, path, images}]}] for JSON/CSV/tables."""
    out = []
    for (path, identity, camid), row_dist, row_idx in zip(q_items, dist.tolist(), idx.tolist()):
        hits = [{"rank": r + 1, "identity": index["identities"][e], "distance": round(d, 6),
                 "path": index["paths"][e], "images": int(index["counts"][e])}
                for r, (d, e) in enumerate(zip(row_dist, row_idx)) if e >= 0]
        out.append({"query": path, "identity": identity, "camid": camid, "results": hits})
    return out


def top1_accuracy(results):
    """(correct, labelled): queries with an identity whose first result has that identity."""
    labelled = [r for r in results if r["identity"]]
    correct = sum(bool(r["results"]) and r["results"][0]["identity"] == r["identity"] for r in labelled)
    return correct, len(labelled)


def format_query_table(results, limit=20):
    """One line per query: its identity, then identity (distance) of each of the top-k."""
    k = max((len(r["results"]) for r in results), default=0)
    lines = [f"{'query':<32} {'identity':<10} " + " ".join(f"{'#' + str(i + 1) + ' id (dist)':<18}" for i in range(k))]
    for r in results[:limit]:
        name = os.path.basename(r["query"])[-32:]
        hits = " ".join(f"{(h['identity'] or '-') + ' (' + format(h['distance'], '.3f') + ')':<18}"
                        for h in r["results"])
        lines.append(f"{name:<32} {r['identity'] or '-':<10} {hits}")
    if len(results) > limit:
        lines.append(f"... {len(results) - limit} more queries (all of them in --json / --csv)")
    return "\n".join(lines)


def write_query_json(results, path, info):
    """Write {'info': ..., 'queries': results} as JSON."""
    with open(path, "w") as f:
        json.dump({"info": info, "queries": results}, f, indent=1)


def write_query_csv(results, path):
    """Write one row per (query, rank): query, query_identity, rank, identity, distance, path, images."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "query_identity", "rank", "identity", "distance", "path", "images"])
        for r in results:
            for h in r["results"]:
                writer.writerow([r["query"], r["identity"], h["rank"], h["identity"], h["distance"], h["path"],
                                 h["images"]])


# ---------------------------------------------------------------------------------------------------
# Command line

def cmd_evaluate(args):
    """retrieve.py evaluate: query and gallery embeddings files -> evaluate.py's per-image and standard centroid
    metrics (the same functions, on the embeddings the production path made)."""
    if args.max_rank < 1:
        raise RetrievalError(f"--max-rank {args.max_rank}: the CMC curve needs at least rank 1")
    query, gallery = load_embeddings(args.query), load_embeddings(args.gallery)
    for key in ("fingerprint", "size", "flip"):
        if query[key] != gallery[key]:
            raise RetrievalError(f"{args.query} and {args.gallery} were embedded with different {key} ({query[key]} "
                                 f"and {gallery[key]}): embed both with the same checkpoint, --size and --flip")
    unknown = int((query["camids"] < 0).sum() + (gallery["camids"] < 0).sum())
    if unknown and not args.camera_agnostic:
        print(f"{unknown} images have no camera (no _c<N> in their names): evaluated camera-agnostically")
    options = EvaluationOptions(camera_agnostic=args.camera_agnostic or unknown > 0, max_rank=args.max_rank)
    results = evaluate_features(*(Split(emb["feats"], emb["pids"], emb["camids"]) for emb in (query, gallery)),
                                options)
    print(f"{len(query['paths'])} queries ({args.query}), {len(gallery['paths'])} gallery images ({args.gallery}), "
          f"model {query['fingerprint']}")
    print(format_results(results))
    if args.json:
        rows = {key: {k: (v.tolist() if k == "cmc" else v) for k, v in res.items()} for key, res in results.items()}
        with open(args.json, "w") as f:
            json.dump({"query": args.query, "gallery": args.gallery, "fingerprint": query["fingerprint"],
                       "camera_agnostic": options.camera_agnostic, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return results


def _device(name):
    """torch.device of --device auto|cuda|npu|cpu."""
    return utils.pick_device(name)


def cmd_embed(args):
    """retrieve.py embed: a checkpoint and images (or a data set split) -> an embeddings file."""
    if bool(args.inputs) == bool(args.dataset):
        raise RetrievalError("give image files/folders or --dataset NAME (with --root and --split), "
                             "not both or neither")
    items = dataset_images(args.dataset, args.root, args.split) if args.dataset else collect_images(args.inputs)
    model = load_model(args.checkpoint, args.arch)
    device = _device(args.device)
    spec = model_embed_spec(model, args.size, args.flip, args.batch_size, args.workers,
                            amp_dtype_for(device, args.fp32))
    labelled = len({name for _, name, _ in items if name})
    print(f"{len(items)} images ({labelled} identities), {model.name} at {spec.size[0]}x{spec.size[1]} on {device}")
    state = embed_to_file(model, items, args.out, device, spec, unreadable_policy(args.skip_bad), args.save_every,
                          args.checkpoint)
    skipped = (f"; skipped {len(state['skipped'])} unreadable: {', '.join(state['skipped'][:3])}"
               if state["skipped"] else "")
    print(f"wrote {args.out}: {len(state['paths'])} embeddings x {state['feats'].shape[1]}-d, fingerprint "
          f"{state['fingerprint']}{skipped}")
    return state


def cmd_index(args):
    """retrieve.py index: embeddings -> a per-image or per-centroid index file."""
    emb = load_embeddings(args.embeddings)
    index = index_from_embeddings(emb, args.centroids, args.camera_aware, args.embeddings)
    utils.save_atomic(index, args.out)
    print(f"wrote {args.out}: {describe_index(index)}, from {len(emb['paths'])} images; "
          f"fingerprint {index['fingerprint']}")
    return index


def _query_embeddings(args, index, device):
    """(feats, items, skipped) of the query inputs: an embeddings file, or images embedded by --checkpoint."""
    if len(args.inputs) == 1 and args.inputs[0].endswith(".pt"):
        emb = load_embeddings(args.inputs[0])
        _check_fingerprint(index, args.index, emb["fingerprint"], f"the embeddings {args.inputs[0]}")
        items = list(zip(emb["paths"], emb["identities"], emb["camids"].tolist()))
        return emb["feats"], items, emb["skipped"]
    if not args.checkpoint:
        raise RetrievalError("embedding query images needs --checkpoint CKPT (the model that built the index)")
    items = collect_images(args.inputs)
    model = load_model(args.checkpoint, args.arch)
    _check_fingerprint(index, args.index, model_fingerprint(model), f"--checkpoint {args.checkpoint}")
    spec = model_embed_spec(model, index["size"], index["flip"], args.batch_size, args.workers,
                            amp_dtype_for(device, args.fp32))
    return embed_in_memory(model, items, device, spec, unreadable_policy(args.skip_bad))


def _check_fingerprint(index, index_path, fingerprint, what):
    """RetrievalError naming both models when the query side was not made by the index's model."""
    if fingerprint != index["fingerprint"]:
        raise RetrievalError(f"{index_path} was built by model {index['fingerprint']} (checkpoint "
                             f"{index['checkpoint'] or '?'}), but {what} is model {fingerprint}: embeddings of "
                             f"different models cannot be compared; query with the index's checkpoint, or "
                             f"rebuild the index (retrieve.py embed + index) with this one")


def cmd_query(args):
    """retrieve.py query: images (or a query embeddings file) against an index -> top-k table, JSON, CSV, PNGs."""
    index = load_index(args.index)
    device = _device(args.device)
    q_feats, items, skipped = _query_embeddings(args, index, device)
    q_camids = torch.tensor([camid for _, _, camid in items], dtype=torch.int64)
    rerank = ({"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda_value": args.rerank_lambda} if args.rerank
              else None)
    dist, idx = search_index(index, q_feats, q_camids, args.top_k, args.backend, device, rerank)
    results = query_results(index, items, dist, idx)
    how = (f"k-reciprocal re-ranking (k1 {args.rerank_k1}, k2 {args.rerank_k2}, lambda {args.rerank_lambda})"
           if rerank else f"backend {args.backend}")
    print(f"{args.index}: {describe_index(index)}; {len(results)} queries, top-{args.top_k} "
          f"{'identities' if index['entry'] == 'centroid' else 'images'}, {how}")
    print(format_query_table(results, args.show))
    correct, labelled = top1_accuracy(results)
    if labelled:
        print(f"top-1 identity correct for {correct} of {labelled} labelled queries ({100 * correct / labelled:.1f}%)")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {', '.join(skipped[:3])}")
    info = {"index": args.index, "entry": index["entry"], "backend": args.backend, "top_k": args.top_k,
            "fingerprint": index["fingerprint"], "skipped": list(skipped), "rerank": rerank}
    if args.json:
        write_query_json(results, args.json, info)
        print(f"wrote {args.json}")
    if args.csv:
        write_query_csv(results, args.csv)
        print(f"wrote {args.csv}")
    if args.visualize:
        pngs = draw_query_results(results, args.visualize, args.visualize_limit)
        print(f"wrote {len(pngs)} ranked lists to {args.visualize}/")
    return results


def _common(parser, model=True):
    """Flags shared by embed and query."""
    if model:
        parser.add_argument("--arch", default=None, help="refuse a checkpoint of another architecture (e.g. resnet50)")
    parser.add_argument("--device", default="auto", help="auto | cuda | npu | cpu (default: auto, the best one)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--fp32", action="store_true", help="no fp16 autocast on accelerators")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted) instead of stopping")


def get_parser():
    """The retrieve.py parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        description="Embed images, build a gallery index, query it (bench.py --stages search measures the search).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="checkpoint + images or a data set -> embeddings file (resumable)")
    p.add_argument("checkpoint", help="our checkpoint (train.py) or an original centroids-reid .ckpt")
    p.add_argument("inputs", nargs="*",
                   help="image files or folders; images in <identity>/ sub-folders get that identity")
    p.add_argument("-o", "--out", required=True, help="embeddings file to write (an unfinished one is resumed)")
    p.add_argument("--dataset", help="embed a data set split instead (market1501, dukemtmcreid, msmt17, folder, ...)")
    p.add_argument("--root", default="data", help="folder holding the data set (default: data)")
    p.add_argument("--split", default="gallery", help="train | query | gallery (default: gallery)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the checkpoint's test size, else 256 128)")
    p.add_argument("--flip", action="store_true", help="average each embedding with its mirror image's")
    p.add_argument("--save-every", type=int, default=10, help="batches between partial saves (default: 10)")
    _common(p)
    p = sub.add_parser("index", help="embeddings -> per-image or per-identity-centroid index")
    p.add_argument("embeddings")
    p.add_argument("-o", "--out", required=True, help="index file to write")
    p.add_argument("--centroids", action="store_true",
                   help="one entry per identity: the L2-normalised mean of its embeddings "
                        "(unlabelled images stay single entries)")
    p.add_argument("--camera-aware", action="store_true",
                   help="with --centroids, also one entry per (identity, camera c) averaging its images from cameras "
                        "other than c: a query from camera c searches those alone, a cross-camera search in which "
                        "no centroid holds an image of the query's camera (not evaluate.py's standard rule, which "
                        "leaves that camera out of the query's own identity only: see `retrieve.py evaluate`)")
    p = sub.add_parser("query", help="images (or a query embeddings .pt) against an index -> top-k")
    p.add_argument("index")
    p.add_argument("inputs", nargs="+", help="image files or folders, or one embeddings file from `embed`")
    p.add_argument("--checkpoint", help="the model that built the index (needed to embed images)")
    p.add_argument("--top-k", type=int, default=5, help="results per query (default: 5)")
    p.add_argument("--backend", default="torch", choices=("torch", "faiss"),
                   help="torch: exact matrix product on --device (default); faiss: IndexFlatIP (pip install faiss-cpu)")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--csv", help="write the results as CSV (one row per query and rank)")
    p.add_argument("--visualize", metavar="DIR", help="write a ranked-list PNG per query (green/red frames by label)")
    p.add_argument("--visualize-limit", type=int, default=50, help="PNGs for at most this many queries (default: 50)")
    p.add_argument("--show", type=int, default=20, help="queries printed in the table (default: 20)")
    p.add_argument("--rerank", action="store_true",
                   help="k-reciprocal re-ranking (Zhong et al. 2017) of the index entries: distances become "
                        "(1 - lambda) Jaccard + lambda scaled distance; its cost grows with (queries + entries)^2")
    p.add_argument("--rerank-k1", type=int, default=20, help="k-reciprocal neighbours (default: 20)")
    p.add_argument("--rerank-k2", type=int, default=6, help="neighbours of the local query expansion (default: 6)")
    p.add_argument("--rerank-lambda", type=float, default=0.3, help="weight of the original distance (default: 0.3)")
    _common(p)
    p = sub.add_parser("evaluate", help="query + gallery embeddings files -> evaluate.py's per-image and standard "
                                        "centroid mAP, CMC, mINP")
    p.add_argument("query", help="embeddings file of the query images (retrieve.py embed --split query)")
    p.add_argument("gallery", help="embeddings file of the gallery images (retrieve.py embed --split gallery)")
    p.add_argument("--camera-agnostic", action="store_true",
                   help="remove nothing (TEST.CAMERA_AGNOSTIC); default: a query's gallery images of its own identity "
                        "and camera are removed, and its identity's centroid leaves out its camera")
    p.add_argument("--max-rank", type=int, default=50, help="length of the CMC curve (TEST.MAX_RANK, default: 50)")
    p.add_argument("--json", help="write the metrics as JSON")
    return parser


def run_command(argv):
    """Run a sub-command; returns what it made (embeddings, index or query results). Bad input raises UserError."""
    args = get_parser().parse_args(argv)
    return {"embed": cmd_embed, "index": cmd_index, "query": cmd_query, "evaluate": cmd_evaluate}[args.command](args)


@utils.command
def main(argv=None):
    """The retrieval command line; returns the exit code (2 and one `error: ...` line for bad input)."""
    run_command(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
