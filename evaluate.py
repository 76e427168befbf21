"""Checkpoint evaluation: embed the query and gallery images (sharded over ranks, gathered), evaluate them per image and
per centroid (support/metrics.py, support/centroids.py), print the table; the evaluation CLI and the raw-pixel baseline.

    python evaluate.py --MODEL.PRETRAIN_PATH output/best.pth --DATASETS.NAMES market1501 --DATASETS.ROOT_DIR data
    python evaluate.py baseline data/synthetic    # raw-pixel nearest-neighbour mAP

The evaluation in three parts: support/metrics.py ranks (mAP, CMC, mINP, the Market-1501 removal rule, the squared
distance), support/centroids.py holds the three centroid rules and their re-ranked forms, this file embeds and reports.
"""
import argparse
import dataclasses
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data import build_datasets, build_test_loader, item_labels, load_image, read_dataset
from model import model_from_checkpoint
from support import config, utils
from support.centroids import PROTOCOL_NOTES, EvaluationOptions, evaluate_features
from support.device_data import device_test_batches
from support.image_check import UnreadableImages, without_paths
from support.metrics import EvaluationError, Split, evaluate_rank, l2_normalize
from support.report import write_config_report
from support.specs import embed_spec
from support.utils import DataError
from visualize import visualize_evaluation


def split_of(items, feats=None):
    """The Split of (path, pid, camid) items and their embeddings (None: labels only)."""
    return Split(feats, *item_labels(items))


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
            feats.append(l2_normalize(emb) if feat_norm else emb)
            pids.append(np.asarray(batch_pids))
            camids.append(np.asarray(batch_camids))
    if not feats:
        raise EvaluationError("the loader yielded no images: the query or gallery list is empty")
    return torch.cat(feats).cpu(), np.concatenate(pids).astype(np.int64), np.concatenate(camids).astype(np.int64)


def extract_split(model, items, cfg, device, amp_dtype=None, rank=0, world_size=1, size=None):
    """Embed this rank's contiguous shard of (path, pid, camid) items and gather every shard, in order, on every
    rank: (feats [N, D] on the device, positions of the items left out as unreadable), both on every rank. Files
    are read under the config's UnreadableImages policy: one it skips is left out (its row holds no image); one it
    does not raises DataError on every rank (its message from the rank that met it), so that all ranks stop
    together rather than wait in the gather for the one that failed."""
    start, end = utils.shard_bounds(len(items), rank, world_size)
    feats, failure, left_out = None, None, []
    if start < end:  # else more ranks than a shard needs (e.g. 5 items, 4 ranks): nothing to embed, still gather
        try:
            feats, left_out = _embed_shard(model, items[start:end], cfg, device, amp_dtype, size)
            feats, left_out = feats.to(device), [start + position for position in left_out]
        except DataError as err:
            if world_size == 1:
                raise
            failure = str(err)
    if world_size > 1:
        reports = utils.all_gather_objects((failure, left_out))
        failures = [message for message, _ in reports if message]
        if failures:
            raise DataError(failures[0])
        left_out = [position for _, positions in reports for position in positions]
    if feats is None:
        feats = torch.zeros(0, model.feat_dim, device=device)
    return utils.gather_rows(feats, len(items)), left_out  # metrics then run on the device too


def _embed_shard(model, items, cfg, device, amp_dtype=None, size=None):
    """(raw embeddings [n, D], positions of the files left out as unreadable) of (path, pid, camid) items, decoded
    on the CPU or, with INPUT.DEVICE_AUGMENT, on the device, under the config's UnreadableImages policy."""
    spec, unreadable = embed_spec(cfg, amp_dtype, size), UnreadableImages.from_config(cfg)
    if cfg.INPUT.DEVICE_AUGMENT:  # decode, resize and normalise on the device: the CPU loader stops being the limit
        loader = device_test_batches(items, spec, device, unreadable)
    else:
        loader = build_test_loader(items, spec, unreadable)
    # raw embeddings: the original's centroid rule averages them before normalising (evaluate_features)
    feats, positions, readable = extract_features(model, loader, device, flip=spec.flip, feat_norm=False,
                                                  amp_dtype=spec.amp_dtype)
    return feats, positions[readable == 0].tolist()


def evaluate_splits(model, data, cfg, device, amp_dtype=None, rank=0, world_size=1, size=None):
    """The one evaluation path (per epoch in train.py, sharded over ranks; the evaluate CLI): embed query and
    gallery, evaluate per image and per centroid (re-ranked with TEST.RERANK). Returns (results, (q_feats,
    g_feats)) on rank 0, (None, None) on the others; the features are the raw embeddings (evaluate_features
    normalises them when TEST.FEAT_NORM). Files the UnreadableImages policy skips (DATALOADER.SKIP_BAD) leave
    data for good, on every rank: later evaluations, and the report of this one, go without them."""
    utils.broadcast_buffers(model)  # every shard embedded by the model rank 0 holds
    q_feats, q_left_out = extract_split(model, data["query"], cfg, device, amp_dtype, rank, world_size, size)
    g_feats, g_left_out = extract_split(model, data["gallery"], cfg, device, amp_dtype, rank, world_size, size)
    if q_left_out or g_left_out:
        q_feats, g_feats = without_rows(q_feats, q_left_out), without_rows(g_feats, g_left_out)
        data.update(without_paths(data, [data["query"][i][0] for i in q_left_out] +
                                  [data["gallery"][i][0] for i in g_left_out]))
    if rank != 0:
        return None, None
    results = evaluate_features(split_of(data["query"], q_feats), split_of(data["gallery"], g_feats),
                                evaluation_arguments(cfg, data["has_cameras"]), raw_feats=True)
    return results, (q_feats, g_feats)


def without_rows(feats, positions):
    """feats [N, D] without the rows at positions."""
    keep = torch.ones(len(feats), dtype=torch.bool)
    keep[positions] = False
    return feats[keep.to(feats.device)]


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
    return evaluate_rank(distmat, split_of(ds["query"]), split_of(ds["gallery"]))["mAP"]


def evaluation_arguments(cfg, has_cameras):
    """The EvaluationOptions of the configuration (train.py and evaluate.py alike), re-ranked with TEST.RERANK."""
    rerank = (cfg.TEST.RERANK_K1, cfg.TEST.RERANK_K2, cfg.TEST.RERANK_LAMBDA) if cfg.TEST.RERANK else None
    return EvaluationOptions(centroid_protocol=cfg.TEST.CENTROID_PROTOCOL,
                             keep_camid_centroids=cfg.MODEL.KEEP_CAMID_CENTROIDS and has_cameras,
                             normalize_centroids=cfg.TEST.FEAT_NORM, camera_agnostic=cfg.TEST.CAMERA_AGNOSTIC,
                             distance=cfg.SOLVER.DISTANCE_FUNC, max_rank=cfg.TEST.MAX_RANK, rerank=rerank)


OPTIONS = [("visualize", ("--visualize",), "", "write ranked lists and the CMC curves as PNG files to DIR "
              "(as TEST.VISUALIZE yes does, into OUTPUT_DIR/visualize)"),
           ("report", ("--report",), "", "write the evaluation as one self-contained HTML page to FILE "
            "(as TEST.REPORT)"),
           ("report_limit", ("--report-limit",), "", "at most N queries in the page's ranked lists, the first ones "
            "(as TEST.REPORT_LIMIT; 0 = all)")]
REPORT_FLAGS = {"report": "TEST.REPORT", "report_limit": "TEST.REPORT_LIMIT"}


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
    plain, options = None, evaluation_arguments(cfg, data["has_cameras"])
    if options.rerank:  # the same embeddings without re-ranking, for comparison
        plain = evaluate_features(split_of(data["query"], q_feats), split_of(data["gallery"], g_feats),
                                  dataclasses.replace(options, rerank=None), raw_feats=True)
    write_config_report(cfg, data, (results, (q_feats, g_feats)), checkpoint, plain)
    visualize_dir = visualize_dir or (os.path.join(cfg.OUTPUT_DIR, "visualize") if cfg.TEST.VISUALIZE == "yes" else "")
    if visualize_dir:
        limit = min(cfg.TEST.VISUALIZE_MAX_NUMBER, len(data["query"]))
        written = visualize_evaluation(split_of(data["query"], q_feats.cpu()), split_of(data["gallery"], g_feats.cpu()),
                                       ([p for p, _, _ in data["query"]], [p for p, _, _ in data["gallery"]]),
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
