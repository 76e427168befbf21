"""Measured speed of every stage: loader, training step (vs the bare backbone step), end to end, feature
extraction, the evaluator (against np.argsort, and on a 1,000,000-item gallery), the centroid protocols, retrieval
search (per image vs per centroid index, exact vs faiss), the pre-flight image check, the losses, k-reciprocal
re-ranking and the HTML evaluation report. Prints one table (stage | figure |
value | unit | device | dtype | batch | input) and, with --json, writes the same rows.

    python bench.py                               # CPU preset, < 5 minutes on 2 cores
    python bench.py --device cuda --json b.json   # accelerator preset: 256x128, fp32/bf16/fp16, CUDA-graphed
                                                  # bf16 step at 64/128/256 images, compile, big batch
    python bench.py --tiny                        # seconds (the test's mode)
    python bench.py --device cuda --gpu-augment   # also decode (+ augment) on the device (workers read bytes)
    python bench.py --device cuda --stages step --dtypes bf16 --graph-ids 16 --graph-compiled \
        --compile-dtypes bf16 --compile-mode max-autotune-no-cudagraphs   # torch.compile variants (minutes)
    python bench.py --stages rerank               # k-reciprocal re-ranking at Market-1501 size only
    python bench.py --device cpu --stages metrics large-gallery   # the evaluator vs np.argsort; 1,000,000 items
    python bench.py --device cpu --stages search  # retrieve.py's index: per image vs per centroid, exact vs faiss
    python bench.py --device cpu --stages report  # the HTML report of a Market-sized simulated evaluation

Every eager training figure runs train.py's own code: train.build_optimizers, train.train_one_epoch
(train.train_step) on a batch already on the device (the step) or on the real loader (end to
end); the graphed figures run cuda_graph.GraphedStep on the same model, losses and optimizers (end to end:
train.train_one_epoch with SOLVER.CUDA_GRAPH true).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torchvision

import train
from data import build_datasets, build_test_loader, build_train_loader, read_dataset
from evaluate import extract_features
from loss import CenterLoss, LossSpec, compute_losses
from model import ARCHS, build_model
from retrieve import SHARED, RetrievalError, build_index, import_faiss, search_exact, search_index
from support import config, faults, utils
from support.centroids import (
    CENTROID_PROTOCOLS,
    EvaluationOptions,
    evaluate_centroids,
    evaluate_features,
    old_per_camera_centroids,
)
from support.cuda_graph import WARMUP_STEPS, graph_supported
from support.device_data import DeviceAugmentLoader, device_test_batches
from support.image_check import dataset_paths, find_bad_images
from support.metrics import Split, evaluate_feature_ranks, evaluate_rank, memory_plan, squared_distances
from support.report import Evaluation, Settings, write_report
from support.rerank import rerank_distances
from support.specs import AugmentSpec, BatchSpec, EmbedSpec, LoaderSpec
from support.synthetic import draw_camera, draw_identity, render_image, synthesize, synthetic_problem
from support.utils import DataError

# Defaults of each preset; any flag given on the command line wins.
PRESETS = {
    "tiny": dict(model="resnet18", size=[64, 32], loader_size=[64, 32], ids=4, instances=4, large_ids=0,
                 dtypes=["fp32"], compile_dtypes=[], warmup=1, rounds=3, steps=1, synth_ids=40,
                 images_per_id=8, epochs=2, feature_images=64, metrics_size=[200, 1000, 100],
                 loader_batches=3, e2e_dtype="fp32", centroid_dim=32, centroid_rounds=1, graph_ids=[],
                 rerank_size=[200, 1000, 64], large_gallery=[100, 20000, 2000, 16], large_search=[5000, 32, 20]),
    "cpu": dict(model="resnet50", size=[64, 32], loader_size=[256, 128], ids=16, instances=4, large_ids=0,
                dtypes=["fp32"], compile_dtypes=[], warmup=1, rounds=7, steps=1, synth_ids=80,
                images_per_id=16, epochs=2, feature_images=256, metrics_size=[3368, 15913, 751],
                loader_batches=10, e2e_dtype="fp32", centroid_dim=2048, centroid_rounds=3, graph_ids=[],
                rerank_size=[3368, 15913, 2048], large_gallery=[200, 1_000_000, 100_000, 64],
                large_search=[1_000_000, 256, 100]),
    "device": dict(model="resnet50", size=[256, 128], loader_size=[256, 128], ids=16, instances=4, large_ids=64,
                   dtypes=["fp32", "bf16", "fp16"], compile_dtypes=["bf16"], warmup=10, rounds=7, steps=20,
                   synth_ids=600, images_per_id=16, epochs=3, feature_images=0, metrics_size=[3368, 15913, 751],
                   loader_batches=20, e2e_dtype="bf16", centroid_dim=2048, centroid_rounds=3,
                   graph_ids=[16, 32, 64], rerank_size=[3368, 15913, 2048],
                   large_gallery=[200, 1_000_000, 100_000, 64], large_search=[1_000_000, 256, 100]),
}
STAGES = ("loader", "step", "e2e", "features", "metrics", "large-gallery", "centroids", "search", "preflight", "losses",
          "rerank", "report")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
DTYPES = ("fp32", "bf16", "fp16")


def get_args_parser():
    """bench.py flags; None means 'the preset's value'."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | npu (default auto)")
    p.add_argument("--preset", choices=list(PRESETS), help="default: cpu on the CPU, device on an accelerator")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny (seconds; used by the test)")
    p.add_argument("--json", default="", help="also write the rows to this JSON file (rewritten after each stage)")
    p.add_argument("--data", default="", help="synthetic data set folder: reused if it exists, else written there "
                   "(default: a temporary folder, deleted afterwards)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default all)")
    p.add_argument("--model", help="backbone (resnet50 on cpu/device, resnet18 tiny)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="training/feature input size")
    p.add_argument("--loader-size", type=int, nargs=2, metavar=("H", "W"), help="loader stage output size")
    p.add_argument("--ids", type=int, help="P: identities per batch (default 16)")
    p.add_argument("--instances", type=int, help="K: images per identity (default 4)")
    p.add_argument("--large-ids", type=int, help="P of the larger-batch step run (0: none)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="step precisions (fp32 = no autocast)")
    p.add_argument("--compile-dtypes", nargs="*", choices=DTYPES, help="precisions also timed with torch.compile")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled rows (default: default)")
    p.add_argument("--graph-ids", type=int, nargs="*",
                   help="P of each CUDA-graphed step run, at --e2e-dtype (device preset: 16 32 64; CUDA only)")
    p.add_argument("--graph-compiled", action="store_true",
                   help="also time the CUDA-graphed step with a torch.compile'd model (at --ids; compiles for minutes)")
    p.add_argument("--e2e-dtype", choices=DTYPES, help="precision of the end-to-end epochs")
    p.add_argument("--e2e-compile", action="store_true", help="torch.compile the end-to-end model")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="loader workers N (default: all cores)")
    p.add_argument("--warmup", type=int, help="untimed steps of each variant before timing")
    p.add_argument("--rounds", type=int, help="alternating full/bare rounds (medians are reported)")
    p.add_argument("--steps", type=int, help="steps per round")
    p.add_argument("--epochs", type=int, help="end-to-end epochs (the first is warm-up, not counted)")
    p.add_argument("--synth-ids", type=int, help="identities of the synthetic data set (half train)")
    p.add_argument("--images-per-id", type=int, help="mean images per identity of the synthetic data set")
    p.add_argument("--feature-images", type=int, help="images embedded in the feature stage (0: all)")
    p.add_argument("--metrics-size", type=int, nargs=3, metavar=("QUERIES", "GALLERY", "IDS"),
                   help="evaluator and report problem (default Market-1501's 3368 15913 751)")
    p.add_argument("--centroid-dim", type=int, help="embedding width of the centroids, search and report stages' "
                   "problems (2048 on cpu/device, 32 tiny)")
    p.add_argument("--centroid-rounds", type=int, help="rounds of the centroids stage, in turn (medians are reported)")
    p.add_argument("--large-gallery", type=int, nargs=4, metavar=("QUERIES", "GALLERY", "IDS", "DIM"),
                   help="large-gallery stage: the evaluator streaming distances (default 200 1000000 100000 64)")
    p.add_argument("--large-search", type=int, nargs=3, metavar=("GALLERY", "DIM", "BATCH"),
                   help="search stage: exact (and faiss) top-10 search of BATCH queries in a GALLERY of DIM-d unit "
                        "vectors (default 1000000 256 100; GALLERY 0 skips it)")
    p.add_argument("--no-faiss", action="store_true", help="search stage: no faiss rows even where faiss imports")
    p.add_argument("--rerank-size", type=int, nargs=3, metavar=("QUERIES", "GALLERY", "DIM"),
                   help="re-ranking problem (default Market-1501's 3368 15913 with 2048-d embeddings)")
    p.add_argument("--gpu-augment", action="store_true",
                   help="also measure decoding (torchvision.io.decode_jpeg) on the device: the augmenting training "
                        "loader, its epochs (eager and CUDA-graphed), and feature extraction")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the main process (default: torch's choice, or 1 when the CPU is busy)")
    p.add_argument("--note", default="", help="a line printed above the table and stored in the JSON")
    return p


def resolve_config(args):
    """Fill every None flag from the preset (tiny, or cpu/device by the device type)."""
    try:
        device_type = utils.pick_device_type(args.device)
    except utils.UserError as err:  # train.py's message names its own flag
        raise utils.UserError(str(err).replace("--MODEL.DEVICE", "--device")) from None
    preset = "tiny" if args.tiny else args.preset or ("cpu" if device_type == "cpu" else "device")
    for key, value in PRESETS[preset].items():
        if vars(args).get(key) is None:
            setattr(args, key, value)
    args.busy = device_type == "cpu" and os.getloadavg()[0] > len(os.sched_getaffinity(0)) / 2
    if args.busy and not args.threads:
        args.threads = 1  # on shared cores every multi-threaded op waits for descheduled threads: 4-8x slower
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset, args.device = preset, torch.device(device_type)
    if device_type != "cpu":
        args.device = torch.device(device_type, getattr(torch, device_type).current_device())
    return args


# ---------------------------------------------------------------------------------------------------
# Rows and the table

def device_name(device):
    """'cpu (2 cores, 1 thread)' or 'cuda:0 NVIDIA H200'."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({len(os.sched_getaffinity(0))} cores, {threads} thread{'s' if threads > 1 else ''})"
    return f"{device} {getattr(torch, device.type).get_device_name(device)}"


def device_label(device):
    """The table's device column: 'cpu 2thr' or the accelerator's name."""
    if device.type == "cpu":
        return f"cpu {torch.get_num_threads()}thr"
    return getattr(torch, device.type).get_device_name(device)


def make_row(stage, figure, value, unit, device, dtype="-", batch="-", size="-"):
    """One result: what was measured, its value and unit, and the conditions it was measured under."""
    return {"stage": stage, "figure": figure, "value": float(value), "unit": unit, "device": device_label(device),
            "dtype": dtype, "batch": batch, "input": "x".join(map(str, size)) if size != "-" else "-"}


def plural(count, word):
    """'1 worker', '2 workers'."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def batch_text(num_ids, num_instances):
    """'16x4=64' (identities x images per identity = images)."""
    return f"{num_ids}x{num_instances}={num_ids * num_instances}"


def format_value(value, unit):
    """Numbers as people read them: 3 significant digits, thousands separated."""
    if unit == "x":
        return f"{value:.3f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_bench_table(rows):
    """The rows as an aligned text table (also valid markdown)."""
    head = ["stage", "figure", "value", "unit", "device", "dtype", "batch", "input"]
    cells = [[r["stage"], r["figure"], format_value(r["value"], r["unit"]), r["unit"], r["device"], r["dtype"],
              r["batch"], r["input"]] for r in rows]
    widths = [max(len(str(c[i])) for c in [head] + cells) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(str(x).rjust(w) if i == 2 else str(x).ljust(w)  # noqa: E731
                                       for i, (x, w) in enumerate(zip(c, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i == 2 else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(c) for c in cells])


def write_bench_json(path, meta, rows, notes):
    """Rows, notes and the conditions (device, versions, date) as JSON."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows, "notes": notes}, f, indent=1)


# ---------------------------------------------------------------------------------------------------
# Data

def synthetic_data_folder(args, tmp):
    """The synthetic data set folder: --data if it already holds one, else written (128x64 JPEGs, Market-sized)."""
    root = args.data or os.path.join(tmp, "synthetic")
    if not (os.path.isdir(root) and os.listdir(root)):
        start = time.perf_counter()
        counts = synthesize(root, ids=args.synth_ids, images_per_id=args.images_per_id, size=(128, 64))
        print(f"synthetic data set {root}: {sum(counts.values())} images 128x64 "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return root


def precision_text(dtype, device, compiled=False, mode="default"):
    """'fp32', 'bf16 cl compiled' ...: the precision plus channels-last (accelerators) and torch.compile (mode)."""
    compiled_text = " compiled" + (f" {mode}" if mode != "default" else "") if compiled else ""
    return dtype + (" cl" if device.type != "cpu" else "") + compiled_text


def amp_for(dtype, device):
    """(autocast dtype or None, GradScaler) for fp32 / bf16 / fp16, made by train.py's helpers."""
    amp_dtype, needs_scaler = utils.amp_settings(device.type, dtype != "fp32", "fp16" if dtype == "fp32" else dtype,
                                                 on_cpu=True)
    return amp_dtype, utils.make_grad_scaler(device, needs_scaler)


# ---------------------------------------------------------------------------------------------------
# Stage 1: the loader

def loader_batches(args, num_steps, workers):
    """How many batches to time: the epoch must also cover start-up and the workers' prefetched batches."""
    batches = min(args.loader_batches, num_steps - 1 - 2 * workers)
    if batches < 1:
        raise DataError(f"the synthetic set gives {num_steps} batches of {batch_text(args.ids, args.instances)} per "
                        f"epoch, too few to time {workers} workers: raise --synth-ids or --images-per-id")
    return batches


def time_loader(loader, skip, batches, device):
    """Images/s of `batches` batches after `skip` (start-up and the batches the workers prefetched)."""
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    utils.synchronize(device)
    start, images = time.perf_counter(), 0
    for _, (x, _, _) in zip(range(batches), iterator):
        images += len(x)
    utils.synchronize(device)
    return images / (time.perf_counter() - start)


def bench_loader(args, root):
    """Decoded + augmented images/s of data.build_train_loader for 0 and N workers."""
    items = read_dataset("synthetic", root)["train"]
    batch, size, rows, threads = batch_text(args.ids, args.instances), args.loader_size, [], torch.get_num_threads()
    row = lambda figure, value, unit="images/s": make_row("loader", figure, value, unit, args.device,  # noqa: E731
                                                          "uint8->fp32", batch, size)
    for workers in sorted({0, args.workers}):
        spec = LoaderSpec(BatchSpec(args.ids, args.instances), AugmentSpec(tuple(size)), workers)
        loader, _ = build_train_loader(items, spec)
        torch.set_num_threads(1)  # as in a loader worker: the main process then measures one worker
        try:
            ips = time_loader(loader, 1 + 2 * workers, loader_batches(args, len(loader), workers),
                              torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        del loader
        if workers == 0:
            rows.append(row("decode+augment, 1 process (1 thread)", ips))
        else:
            rows.append(row(f"decode+augment, {plural(workers, 'worker')}", ips))
            rows.append(row(f"per worker ({plural(workers, 'worker')})", ips / workers, "images/s/worker"))
    return rows


def bench_device_loader(args, root):
    """Images/s of the --gpu-augment loader: workers read bytes, the device decodes and augments."""
    items = read_dataset("synthetic", root)["train"]
    spec = LoaderSpec(BatchSpec(args.ids, args.instances), AugmentSpec(tuple(args.loader_size)), args.workers,
                      device_augment=True)
    loader = DeviceAugmentLoader(items, spec, args.device)
    batches = loader_batches(args, len(loader.batch_sampler), args.workers)
    ips = time_loader(loader, 1 + 2 * args.workers, batches, args.device)
    return [make_row("loader", f"read bytes ({plural(args.workers, 'worker')}) + decode+augment on "
                     f"{args.device.type}", ips, "images/s", args.device, "uint8->fp32",
                     batch_text(args.ids, args.instances), args.loader_size)]


# ---------------------------------------------------------------------------------------------------
# Stage 2: the training step against the bare backbone step

class RepeatedBatch:
    """A loader stand-in for train.train_one_epoch: one device-resident batch, `steps` times."""

    def __init__(self, batch, steps):
        self.batch, self.batch_sampler, self.bad_message = batch, range(steps), ""

    def __iter__(self):
        return (self.batch for _ in self.batch_sampler)


def train_config(args, num_ids, dtype, extra=()):
    """train.py's own configuration for a run of this bench (everything else at the defaults)."""
    cfg, _, _ = config.parse([
        "--MODEL.NAME", args.model, "--MODEL.PRETRAINED", "false", "--MODEL.DEVICE", args.device.type,
        "--SOLVER.IMS_PER_BATCH", str(num_ids), "--DATALOADER.NUM_INSTANCE", str(args.instances),
        "--INPUT.SIZE_TRAIN", *map(str, args.size), "--INPUT.SIZE_TEST", *map(str, args.size),
        "--USE_MIXED_PRECISION", str(dtype != "fp32"), "--SOLVER.AMP_DTYPE", "fp16" if dtype == "fp32" else dtype,
        "--SOLVER.CUDA_GRAPH", "false", "--DATALOADER.NUM_WORKERS", str(args.workers), *extra])
    return cfg


def bare_round(forward, optimizer, scaler, images, device, amp_dtype, steps):
    """(wall, process CPU) seconds per bare step: backbone + pooling forward, mean as the loss, backward, Adam."""
    utils.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        with utils.autocast(device, amp_dtype):
            feat = forward(images)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(feat.float().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    utils.synchronize(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def full_round(state, batch, cfg, device, steps):
    """(wall, process CPU) seconds per full step, run by train.train_one_epoch on a repeated device-resident batch."""
    utils.synchronize(device)  # no earlier work may still be queued when the clock starts
    start, cpu_start = time.perf_counter(), time.process_time()
    train.train_one_epoch(state, RepeatedBatch(batch, steps), cfg, device, 0, 0, 1)  # ends with a synchronisation
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def step_setup(args, dtype, num_ids, num_classes=751):
    """train.py's configuration, model, center loss and optimizers for a step measurement, and one
    device-resident identity-major P x K batch (images, pids, camids, is_real)."""
    device, K = args.device, args.instances
    cfg = train_config(args, num_ids, dtype)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes, cfg.MODEL.LAST_STRIDE)
    center_loss = CenterLoss(num_classes, model.feat_dim).to(device)
    model.to(device, memory_format=utils.memory_format(device))
    optimizers = train.build_optimizers(cfg, model, center_loss)  # (optimizer, center optimizer, scheduler)
    images = torch.randn(num_ids * K, 3, *args.size, device=device).contiguous(
        memory_format=utils.memory_format(device))
    pids = torch.arange(num_ids, device=device).repeat_interleave(K)  # identity-major, as the PK sampler gives
    return cfg, model, center_loss, optimizers, (images, pids, torch.zeros_like(pids), torch.ones_like(pids).bool())


def bench_step(args, dtype, compiled, num_ids, notes):
    """Full training step vs bare backbone step on one batch, alternating rounds: images/s and the ratio."""
    device, K = args.device, args.instances
    cfg, model, center_loss, optimizers, batch = step_setup(args, dtype, num_ids)
    images = batch[0]
    bare_optimizer = train.build_optimizers(cfg, model.backbone, center_loss)[0]  # the same Adam, backbone only
    amp_dtype, full_scaler = amp_for(dtype, device)
    _, bare_scaler = amp_for(dtype, device)
    mode = {"mode": args.compile_mode} if args.compile_mode != "default" else {}
    state = train.TrainState(model, center_loss, *optimizers, full_scaler, None,
                             train_model=torch.compile(model, **mode) if compiled else model, amp_dtype=amp_dtype,
                             losses=train.loss_spec(cfg))

    def pooled(x):  # the backbone and global average pooling: [B, 3, H, W] -> [B, D]
        return model.backbone(x).mean(dim=(2, 3))
    bare_forward = torch.compile(pooled, **mode) if compiled else pooled
    run_full = lambda n: full_round(state, batch, cfg, device, n)  # noqa: E731
    run_bare = lambda n: bare_round(bare_forward, bare_optimizer, bare_scaler, images, device,  # noqa: E731
                                    amp_dtype, n)
    run_full(args.warmup), run_bare(args.warmup)
    scales = full_scaler.get_scale(), bare_scaler.get_scale()
    full_s, bare_s = [], []
    for r in range(args.rounds):  # alternate which goes first, so that a drifting load hits both alike
        if r % 2:
            bare_s.append(run_bare(args.steps))
            full_s.append(run_full(args.steps))
        else:
            full_s.append(run_full(args.steps))
            bare_s.append(run_bare(args.steps))
    skipped = [round(math.log2(before / max(s.get_scale(), 1e-30)))
               for before, s in zip(scales, (full_scaler, bare_scaler)) if s.is_enabled()]
    if any(skipped):
        notes.append(f"{dtype}: the loss scaler skipped {skipped} (full, bare) optimizer steps while timing "
                     f"(non-finite fp16 gradients); those steps did less work")
    precision, batch_name = precision_text(dtype, device, compiled, args.compile_mode), batch_text(num_ids, K)
    images_per_step = num_ids * K
    row = lambda figure, value, unit: make_row("step", figure, value, unit, device, precision,  # noqa: E731
                                               batch_name, args.size)
    rows = [row("full step: fwd, 4 losses, bwd, Adam + center SGD",
                images_per_step / statistics.median(f[0] for f in full_s), "images/s"),
            row("bare step: backbone fwd + pool, bwd, Adam", images_per_step / statistics.median(b[0] for b in bare_s),
                "images/s"),
            row("full / bare step time (median of rounds)",
                statistics.median(f[0] / b[0] for f, b in zip(full_s, bare_s)), "x")]
    if device.type == "cpu":  # CPU seconds do not grow when other processes share the cores
        rows.append(row("full / bare step CPU time (median of rounds)",
                        statistics.median(f[1] / b[1] for f, b in zip(full_s, bare_s)), "x"))
    return rows


def graph_round(graphed, images, pids, device, steps):
    """Seconds per graphed step, with train_one_epoch's per-step bookkeeping (the loss sums stay on the device)."""
    sums = torch.zeros(5, device=device)
    utils.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        sums += graphed.step(images, pids)
    utils.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_graph_step(args, dtype, num_ids, compiled=False):
    """Images/s of the full step captured in a CUDA graph (cuda_graph.GraphedStep), on one device batch."""
    device = args.device
    amp_dtype, _ = amp_for(dtype, device)
    supported, reason = graph_supported(device, amp_dtype)
    if not supported:
        raise RuntimeError(reason)
    cfg, model, center_loss, optimizers, (images, pids, _, _) = step_setup(args, dtype, num_ids)
    mode = {"mode": args.compile_mode} if args.compile_mode != "default" else {}
    state = train.TrainState(model, center_loss, *optimizers, amp_for(dtype, device)[1], None, amp_dtype=amp_dtype,
                             losses=train.loss_spec(cfg))
    if compiled:
        state.model = torch.compile(model, **mode)  # the graph trains state.model itself
    graphed = train.graphed_step(state, tuple(images.shape))
    graph_round(graphed, images, pids, device, WARMUP_STEPS + args.warmup)  # eager warm-up, capture, replays
    if not graphed.captured:
        raise RuntimeError(graphed.fallback_reason)
    seconds = [graph_round(graphed, images, pids, device, args.steps) for _ in range(args.rounds)]
    what = "CUDA graph of a compiled model" if compiled else "one CUDA graph"
    return [make_row("step", f"graphed full step: fwd, 4 losses, bwd, Adam + center SGD ({what})",
                     num_ids * args.instances / statistics.median(seconds), "images/s", device,
                     precision_text(dtype, device, compiled, args.compile_mode), batch_text(num_ids, args.instances),
                     args.size)]


def free_caches(device):
    """Free cached device memory and compiled graphs between configurations."""
    torch._dynamo.reset()
    if device.type != "cpu":
        getattr(torch, device.type).empty_cache()


# ---------------------------------------------------------------------------------------------------
# Stage 3: real epochs with the loader

def bench_end_to_end(args, root, device_augment=False, graph=False):
    """Images/s of real train.py epochs (train.build_state + train.train_one_epoch, eager or with the CUDA-graphed
    step), first epoch not counted."""
    device, dtype = args.device, args.e2e_dtype
    cfg = train_config(args, args.ids, dtype,
                       ["--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR", root,
                        "--INPUT.DEVICE_AUGMENT", str(device_augment), "--SOLVER.CUDA_GRAPH", str(graph)])
    torch.manual_seed(0)
    data = build_datasets(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR)
    loader, state = train.build_state(cfg, data, device, 0, 1)
    if args.e2e_compile:
        state.train_model = torch.compile(state.train_model)
    train.build_graphed_step(state, cfg, device)
    loader, sampler = faults.guard_train_loader(loader, cfg), state.sampler
    seconds = waiting = steps = 0.0
    for epoch in range(max(2, args.epochs)):
        sampler.set_epoch(epoch)
        stats, _ = train.train_one_epoch(state, loader, cfg, device, epoch, 0, 1)
        if epoch:  # the first epoch starts the workers (and compiles): not counted
            seconds += stats["step_time_s"] * len(sampler)
            waiting += stats["data_time_s"] * len(sampler)
            steps += len(sampler)
    where = f"decode+augment on {device.type}" if device_augment else plural(args.workers, "loader worker")
    where += ", CUDA-graphed step" if graph else ""
    precision, batch = precision_text(dtype, device, args.e2e_compile), batch_text(args.ids, args.instances)
    return [make_row("e2e", f"training epochs, {where}", steps * args.ids * args.instances / seconds, "images/s",
                     device, precision, batch, args.size),
            make_row("e2e", f"share of step time waiting for data ({where})", 100 * waiting / seconds, "%",
                     device, precision, batch, args.size)]


# ---------------------------------------------------------------------------------------------------
# Stage 4: feature extraction

def bench_features(args, root):
    """Images/s of evaluate.extract_features over the query + gallery images with the test loader."""
    device, data = args.device, read_dataset("synthetic", root)
    items = data["query"] + data["gallery"]
    items = items[:args.feature_images] if args.feature_images else items
    batch_size = config.DEFAULTS["TEST.IMS_PER_BATCH"]
    amp_dtype, _ = amp_for(args.e2e_dtype, device)
    model = build_model(args.model, data["num_train_pids"]).to(device, memory_format=utils.memory_format(device))
    spec, warm_up = EmbedSpec(tuple(args.size), batch_size, args.workers), EmbedSpec(tuple(args.size), batch_size)
    extract_features(model, build_test_loader(items[:batch_size], warm_up), device,
                     amp_dtype=amp_dtype)  # warm-up: first-call allocations and kernel choices
    loaders = {plural(args.workers, "worker"): lambda: build_test_loader(items, spec)}
    if args.gpu_augment:
        loaders[f"decode on {device.type} ({plural(args.workers, 'worker')} read bytes)"] = (
            lambda: device_test_batches(items, spec, device))
    rows = []
    for where, make_loader in loaders.items():
        loader = make_loader()
        utils.synchronize(device)
        start = time.perf_counter()
        extract_features(model, loader, device, amp_dtype=amp_dtype)
        utils.synchronize(device)
        rows.append(make_row("features", f"extract_features, {len(items)} images, {where}",
                             len(items) / (time.perf_counter() - start), "images/s", device,
                             precision_text(args.e2e_dtype, device), str(batch_size), args.size))
    return rows


# ---------------------------------------------------------------------------------------------------
# Peak memory, and the metrics an evaluation gave on a synthetic problem (synthetic.synthetic_problem)

def peak_rss_mib():
    """Peak resident memory of this process so far, MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter of this process (Linux); False when it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_mark(device):
    """Start a peak-memory measurement: reset the peak; returns the memory in use now (MiB)."""
    if device.type == "cpu":
        reset_peak_rss()
        return peak_rss_mib()  # the peak was just reset to the current resident size
    getattr(torch, device.type).reset_peak_memory_stats(device)
    return getattr(torch, device.type).memory_allocated(device) / 2**20


def memory_peak(device):
    """Peak memory (MiB) since memory_mark: resident size on the CPU, allocated device memory otherwise."""
    if device.type == "cpu":
        return peak_rss_mib()
    return getattr(torch, device.type).max_memory_allocated(device) / 2**20


def print_problem_metrics(name, result):
    """A progress line (not a table row): the metrics an evaluation gave on the stage's synthetic problem, in %."""
    extra = f", mINP {100 * result['mINP']:.3f} %" if "mINP" in result else ""
    print(f"  {name}: mAP {100 * result['mAP']:.3f} %, R1 {100 * float(result['cmc'][0]):.3f} %{extra}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Stage 5: the evaluator against np.argsort, and on a large gallery

def bench_metrics(args):
    """evaluate_rank against np.argsort of the same Market-sized distance matrix (--metrics-size, 6 cameras), in one
    process; on the CPU evaluate_rank also with one thread (np.argsort uses one), on an accelerator torch.argsort
    there. Prints the problem's mAP, R1 and mINP."""
    num_query, num_gallery, num_ids = args.metrics_size
    device, threads = args.device, torch.get_num_threads()
    q_feats, q_pids, q_camids, g_feats, g_pids, g_camids = synthetic_problem(num_query, num_gallery, num_ids, 6,
                                                                             device=str(device))
    distmat = squared_distances(q_feats, g_feats)                                     # [Q, N] float32
    distmat_np = distmat.cpu().numpy()
    labels = (Split(None, q_pids, q_camids), Split(None, g_pids, g_camids))
    evaluate_rank(distmat[:16], Split(None, q_pids[:16], q_camids[:16]), labels[1])  # warm-up
    _, (argsort_s,) = utils.timed(lambda: np.argsort(distmat_np, axis=1), "cpu")
    result, (evaluate_s,) = utils.timed(lambda: evaluate_rank(distmat, *labels), device)
    print_problem_metrics("evaluate_rank", result)
    row = lambda figure, value, unit="s": make_row("metrics", figure, value, unit, device,  # noqa: E731
                                                   "fp32", "-", (num_query, num_gallery))
    rows = [row(f"evaluate_rank (mAP, CMC, mINP), {plural(threads, 'thread')}", evaluate_s),
            row("np.argsort(distmat, axis=1) on the CPU", argsort_s),
            row("evaluate_rank / np.argsort", evaluate_s / argsort_s, "x")]
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            _, (one_thread_s,) = utils.timed(lambda: evaluate_rank(distmat, *labels), device)
        finally:
            torch.set_num_threads(threads)
        rows.append(row("evaluate_rank, 1 thread / np.argsort", one_thread_s / argsort_s, "x"))
    elif device.type != "cpu":
        _, (device_argsort_s,) = utils.timed(lambda: torch.argsort(distmat, dim=1), device)
        rows.append(row(f"torch.argsort on {device.type}", device_argsort_s))
    return rows


def bench_large_gallery(args, notes):
    """evaluate_feature_ranks of --large-gallery's queries against its gallery (a 1,000,000-item one by default) from
    embeddings, distances streamed per chunk: seconds, the peak memory it added above its inputs (where the peak can
    be reset), the bound metrics.memory_plan designs for and the size of the distance matrix it never holds."""
    num_query, num_gallery, num_ids, dim = args.large_gallery
    device = args.device
    problem = synthetic_problem(num_query, num_gallery, num_ids, 6, dim=dim, device=str(device))
    measured = device.type != "cpu" or reset_peak_rss()  # else the peak would be the whole run's
    base = memory_mark(device)
    result, (seconds,) = utils.timed(lambda: evaluate_feature_ranks(Split(*problem[:3]), Split(*problem[3:])), device)
    peak_extra = memory_peak(device) - base
    print_problem_metrics("evaluate_feature_ranks", result)
    queries_per_chunk, block, chunks_at_once, bound = memory_plan(num_query, num_gallery, device)
    row = lambda figure, value, unit: make_row("large-gallery", figure, value, unit, device,  # noqa: E731
                                               "fp32", "-", (num_query, num_gallery))
    rows = [row(f"evaluate_feature_ranks, {dim}-d, distances streamed ({queries_per_chunk} queries x "
                f"{block:,} items per chunk)", seconds, "s"),
            row(f"live tensors by design ({plural(chunks_at_once, 'chunk')} at once + the gallery's sort buffers)",
                bound / 2**20, "MiB"),
            row("the [Q, N] float32 distance matrix (never held)", num_query * num_gallery * 4 / 2**20, "MiB")]
    if not measured:
        notes.append("large-gallery: no peak memory row (this system cannot reset the peak resident size)")
    else:
        where = "resident memory" if device.type == "cpu" else "device memory allocated"
        rows.insert(1, row(f"peak {where} above the inputs", max(peak_extra, 0.0), "MiB"))
    return rows


# ---------------------------------------------------------------------------------------------------
# Stage 6: the centroid protocols against the rule used before them

OLD_RULE = "centroids, old per-camera rule, baseline"  # centroids.old_per_camera_centroids


def bench_centroids(args):
    """Seconds (median of --centroid-rounds, taken in turn) of per-image evaluation, the old per-camera centroid rule
    and each centroid protocol on one Market-sized problem (--metrics-size, 6 cameras) of --centroid-dim
    embeddings, and standard / old; prints each evaluation's mAP and R1."""
    num_query, num_gallery, num_ids = args.metrics_size
    device, dim, num_cams = args.device, args.centroid_dim, 6
    # random noise separates identities better in more dimensions: grown as dim ** 0.34, the per-image
    # mAP stays near the 64-d default's (measured at 2048-d: ~80%), not a trivial 100%
    problem = synthetic_problem(num_query, num_gallery, num_ids, num_cams, dim=dim, noise=0.95 * (dim / 64) ** 0.34,
                                device=str(device))
    query, gallery = Split(*problem[:3]), Split(*problem[3:])
    runs = {"per image": lambda: evaluate_feature_ranks(query, gallery),
            OLD_RULE: lambda: old_per_camera_centroids(query, gallery)}
    runs.update({f"centroids, {name}": (lambda name=name: evaluate_centroids(
        query, gallery, EvaluationOptions(centroid_protocol=name))) for name in CENTROID_PROTOCOLS})
    evaluate_centroids(Split(*(x[:16] for x in query)), gallery)  # warm-up: first-call allocations
    seconds = {name: [] for name in runs}
    for _ in range(args.centroid_rounds):  # in turn, so that a drifting load hits every variant alike
        for name, run in runs.items():
            result, (spent,) = utils.timed(run, device)
            seconds[name].append(spent)
            if len(seconds[name]) == 1:
                print_problem_metrics(name, result)
    median = {name: float(np.median(spent)) for name, spent in seconds.items()}
    size, what = (num_query, num_gallery), f"{num_ids} ids, {num_cams} cams, {dim}-d"
    rows = [make_row("centroids", f"{name} ({what})", median[name], "s", device, "fp32", "-", size) for name in runs]
    return rows + [make_row("centroids", "centroids standard / old per-camera rule",
                            median["centroids, standard"] / median[OLD_RULE], "x", device, "fp32", "-", size)]


# ---------------------------------------------------------------------------------------------------
# Stage 7: retrieval search (retrieve.py's index), per image vs per centroid, and a 1,000,000-vector gallery

SEARCH_TOP_K = 10


def faiss_available():
    """Whether faiss imports (the optional backend of retrieve.py)."""
    try:
        import_faiss()
        return True
    except RetrievalError:  # it names the install command; here a note says so
        return False


def index_search_rows(args):
    """retrieve.py's exact search of --metrics-size's queries in a per-image and a per-centroid index of
    --centroid-dim embeddings (6 cameras): seconds, milliseconds per query and the index's size."""
    num_query, num_gallery, num_ids = args.metrics_size
    device, dim, k = args.device, args.centroid_dim, SEARCH_TOP_K
    q_feats, _, q_camids, g_feats, g_pids, g_camids = synthetic_problem(num_query, num_gallery, num_ids, 6, dim=dim)
    row = lambda figure, value, unit: make_row("search", figure, value, unit, device,  # noqa: E731
                                               "fp32", "-", (num_query, num_gallery))
    rows = []
    for label, centroids in (("per image", False), ("per centroid", True)):
        index = build_index(g_feats, g_pids, g_camids, centroids)
        search_index(index, q_feats[:8], q_camids[:8], k, "torch", device)  # warm-up
        _, (seconds,) = utils.timed(lambda index=index: search_index(index, q_feats, q_camids, k, "torch", device),
                                    device)
        entries, num_centroids = len(index["pids"]), int((index["exclude_camids"] != SHARED).sum())
        parts = (f"{num_centroids:,} centroids + {entries - num_centroids:,} distractor images"
                 if num_centroids else "one per image")
        what = f"{label} index, {entries:,} entries ({parts}), {dim}-d"
        rows += [row(f"{what}: top-{k} of all queries", seconds, "s"),
                 row(f"{what}: per query", 1000 * seconds / num_query, "ms"),
                 row(f"{what}: index size", index["feats"].numel() * 4 / 2**20, "MiB")]
    return rows


def large_search_rows(args, notes):
    """Exact matrix-product search against faiss IndexFlatIP (where it imports, unless --no-faiss) of --large-search's
    batch of queries in a random unit-vector gallery, best of 3: milliseconds, and whether each query, a slightly
    moved gallery vector, finds its own vector first (and the same top-k from both)."""
    num_gallery, dim, batch = args.large_search
    device, k, use_faiss = args.device, SEARCH_TOP_K, not args.no_faiss and faiss_available()
    if not use_faiss and not args.no_faiss:
        notes.append("search: no faiss rows (pip install faiss-cpu to time retrieve.py's faiss backend)")
    gen = torch.Generator().manual_seed(0)
    g_feats = torch.randn(num_gallery, dim, generator=gen)
    g_feats.div_(g_feats.norm(dim=1, keepdim=True))                                # in place: 1 copy in memory
    picked = torch.randint(0, num_gallery, (batch,), generator=gen)
    q_feats = torch.nn.functional.normalize(g_feats[picked] + 0.05 * torch.randn(batch, dim, generator=gen), dim=1)
    g_dev, q_dev = g_feats.to(device), q_feats.to(device)
    (_, exact_idx), seconds = utils.timed(lambda: search_exact(q_dev, g_dev, k), device, repeats=3)
    exact_idx, g_dev = exact_idx.cpu(), None  # the device copy goes before faiss copies the gallery
    size, what = (batch, num_gallery), f"{num_gallery:,} unit vectors x {dim}-d, top-{k}, batch of {batch} queries"

    def row(figure, value, unit, on=device, batch_column=str(batch)):
        return make_row("search", figure, value, unit, on, "fp32", batch_column, size)
    rows = [row(f"exact search (matrix product, chunked), {what}, best of 3", 1000 * min(seconds), "ms"),
            row("queries whose own gallery vector came first (exact)",
                100 * (exact_idx[:, 0] == picked).float().mean(), "%")]
    if use_faiss:
        flat, cpu = import_faiss().IndexFlatIP(dim), torch.device("cpu")
        _, (add_s,) = utils.timed(lambda: flat.add(g_feats.numpy()), "cpu")
        q_np = np.ascontiguousarray(q_feats.numpy())
        (_, faiss_idx), seconds = utils.timed(lambda: flat.search(q_np, k), "cpu", repeats=3)
        rows += [row(f"faiss IndexFlatIP, {what}, best of 3", 1000 * min(seconds), "ms", cpu),
                 row("faiss IndexFlatIP: adding the gallery", add_s, "s", cpu, "-"),
                 row("queries with the same top-k from faiss as from the exact search",
                     100 * (torch.from_numpy(faiss_idx) == exact_idx).all(1).float().mean(), "%", cpu)]
    return rows


def bench_search(args, notes):
    """retrieve.py's search: a per-image against a per-centroid index, and exact (and faiss) search in a large
    gallery (--large-search; a gallery of 0 skips that part)."""
    return index_search_rows(args) + (large_search_rows(args, notes) if args.large_search[0] else [])


# ---------------------------------------------------------------------------------------------------
# Stage 8: k-reciprocal re-ranking

def bench_rerank(args):
    """rerank.rerank_distances (k1 20, k2 6, lambda 0.3) on a synthetic problem: seconds, peak memory (and the
    memory in use before the call: the difference is what re-ranking adds)."""
    num_query, num_gallery, dim = args.rerank_size
    device = args.device
    q_feats, _, _, g_feats, _, _ = synthetic_problem(num_query, num_gallery, max(2, round(num_gallery / 21.2)), 6,
                                                     dim=dim, device=device)
    rerank_distances(q_feats[:64], g_feats[:256])  # warm-up: first-call allocations and kernel choices
    utils.synchronize(device)
    before = memory_mark(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    dist = rerank_distances(q_feats, g_feats)
    utils.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = memory_peak(device)
    assert dist.shape == (num_query, num_gallery) and bool(torch.isfinite(dist).all())
    size, figure = [f"{num_query}+{num_gallery}", dim], "rerank_distances k1=20 k2=6 lambda=0.3"
    where = "resident memory of the process" if device.type == "cpu" else "device memory allocated"
    rows = [make_row("rerank", f"{figure}, {plural(torch.get_num_threads(), 'thread')}", seconds, "s", device,
                     "fp32", "-", size),
            make_row("rerank", f"{figure}: peak {where}", peak, "MiB", device, "fp32", "-", size),
            make_row("rerank", f"{where} before it (the inputs included)", before, "MiB", device, "fp32", "-", size)]
    if device.type == "cpu":
        rows.append(make_row("rerank", f"{figure}: process CPU time", cpu_seconds, "s", device, "fp32", "-", size))
    return rows


# ---------------------------------------------------------------------------------------------------
# Stage 9: the HTML evaluation report

REPORT_POOL = 64  # generated person images the simulated items' files share


def simulated_items(folder, pids, camids, split, pool):
    """(path, pid, camid) items whose files are hard links to the pool's images under Market-style names: each item
    is a file of its own, read, resized and encoded for the report as a distinct image."""
    items = []
    for i, (pid, camid) in enumerate(zip(pids.tolist(), camids.tolist())):
        path = os.path.join(folder, f"{split}_{pid:04d}_c{camid + 1}s1_{i:06d}_00.jpg")
        os.link(pool[i % len(pool)], path)
        items.append((path, pid, camid))
    return items


def bench_report(args):
    """report.write_report of a simulated evaluation the size of --metrics-size (Market-1501: 3,368 queries, 15,913
    gallery images): seconds and the page's size. Embeddings are synthetic_problem's (--centroid-dim wide, noisy
    enough for failures); every item's file is a hard link to one of REPORT_POOL generated 128x64 person images
    (support/synthetic.py)."""
    num_query, num_gallery, num_ids = args.metrics_size
    # at 2048-d the default noise separates every identity: 3.5 gives R1 ~95%, mAP ~65% (failures to show)
    noise = 3.5 if args.centroid_dim >= 1024 else 0.95
    q_feats, q_pids, q_camids, g_feats, g_pids, g_camids = synthetic_problem(
        num_query, num_gallery, num_ids, 6, dim=args.centroid_dim, noise=noise, device=str(args.device))
    results = evaluate_features(Split(q_feats, q_pids, q_camids), Split(g_feats, g_pids, g_camids))
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        rng = np.random.default_rng(0)
        pool = [os.path.join(tmp, f"pool_{i}.jpg") for i in range(REPORT_POOL)]
        for path in pool:
            render_image(rng, draw_identity(rng), draw_camera(rng), (128, 64)).save(path, quality=90)
        evaluation = Evaluation(simulated_items(tmp, q_pids, q_camids, "query", pool), simulated_items(
            tmp, g_pids, g_camids, "gallery", pool), q_feats, g_feats, results, source="simulated embeddings",
            dataset="simulated")
        written = write_report(os.path.join(tmp, "report.html"), evaluation, Settings())
    print(f"  wrote a report of {written.held} queries, {num_gallery} gallery images: {written.bytes / 2**20:.1f} MiB "
          f"in {written.seconds:.1f} s", flush=True)
    size, device = (f"{num_query}+{num_gallery}", args.centroid_dim), args.device
    figure = f"write_report: {num_query} queries x top 10 per image and per centroid, 64x32 thumbnails"
    return [make_row("report", f"{figure}, {plural(torch.get_num_threads(), 'thread')}", written.seconds, "s",
                     device, "fp32", "-", size),
            make_row("report", "the page's size", written.bytes / 2**20, "MiB", device, "fp32", "-", size)]


# ---------------------------------------------------------------------------------------------------
# Main

def step_configs(args):
    """(dtype, compiled, P) of every training-step measurement."""
    configs = [(dtype, False, args.ids) for dtype in args.dtypes]
    if args.large_ids:
        configs.append((args.e2e_dtype, False, args.large_ids))
    return configs + [(dtype, True, args.ids) for dtype in args.compile_dtypes]


LOSS_CLASSES = 751  # identities of the losses stage's classifier and center loss: Market-1501's training set


def median_ms(step, device, warmup, iters):
    """Median wall time of step() in ms after warm-up calls."""
    _, seconds = utils.timed(step, device, repeats=iters, warmup=warmup)
    return statistics.median(seconds) * 1000


def bench_preflight(args, root):
    """Images/s of the pre-flight image check (data.find_bad_images) on the synthetic set, in process and with the
    loader workers, each on a cold check (the cache of checked sets is not consulted)."""
    paths = dataset_paths(read_dataset("synthetic", root))
    rows = []
    for workers in sorted({0, args.workers}):
        start = time.perf_counter()
        bad = find_bad_images(paths, workers, progress=False)
        seconds = time.perf_counter() - start
        if bad:
            raise DataError(f"the pre-flight check found {len(bad)} bad images in the synthetic set: {bad[0]}")
        rows.append(make_row("preflight", f"image check, {len(paths)} files, {plural(workers, 'loader worker')}",
                             len(paths) / seconds, "images/s", torch.device("cpu"), "-", "-", "-"))
    return rows


def bench_losses(args):
    """The four losses' forward+backward (compute_losses, LOSS_CLASSES classes) against the model's forward+backward
    on one P x K batch of random images, in --e2e-dtype autocast: milliseconds (medians) and their ratio."""
    device, dtype, num_ids, num_instances = args.device, args.e2e_dtype, args.ids, args.instances
    amp_dtype = amp_for(dtype, device)[0]
    model = build_model(args.model, LOSS_CLASSES).to(device).to(memory_format=torch.channels_last).train()
    center_loss = CenterLoss(LOSS_CLASSES, model.feat_dim).to(device)
    images = torch.randn(num_ids * num_instances, 3, *args.size, device=device).contiguous(
        memory_format=torch.channels_last)
    pids = torch.arange(num_ids, device=device).repeat_interleave(num_instances)

    def model_step():
        model.zero_grad(set_to_none=True)
        with utils.autocast(device, amp_dtype):
            feat, logits = model(images)
        (feat.float().mean() + logits.float().mean()).backward()

    with utils.autocast(device, amp_dtype):
        feat, logits = model(images)
    feat, logits = feat.detach().requires_grad_(), logits.detach().requires_grad_()

    def loss_step():
        feat.grad = logits.grad = center_loss.centers.grad = None
        with utils.autocast(device, amp_dtype):
            total, _ = compute_losses(feat, logits, pids, center_loss, LossSpec(num_instances))
        total.backward()

    backbone_ms = median_ms(model_step, device, 1, max(1, args.rounds // 2))
    losses_ms = median_ms(loss_step, device, 3, 20)
    row = lambda figure, value, unit: make_row("losses", figure, value, unit, device,  # noqa: E731
                                               precision_text(dtype, device), batch_text(num_ids, num_instances),
                                               args.size)
    return [row(f"{args.model} forward+backward", backbone_ms, "ms"),
            row(f"four losses forward+backward ({LOSS_CLASSES} classes)", losses_ms, "ms"),
            row("losses / model step", 100 * losses_ms / backbone_ms, "%")]


def graph_runs(args, notes):
    """(title, function) of the CUDA-graphed step runs, and of the compiled one (a note says why there are none)."""
    supported, reason = graph_supported(args.device, amp_for(args.e2e_dtype, args.device)[0])
    if not supported:
        if (args.graph_ids or args.graph_compiled) and args.device.type == "cuda":
            notes.append(f"no CUDA-graphed rows: {reason}")
        return [], []
    precision = precision_text(args.e2e_dtype, args.device)
    runs = [(f"graphed training step: {precision}, {batch_text(n, args.instances)} images",
             lambda n=n: bench_graph_step(args, args.e2e_dtype, n)) for n in args.graph_ids]
    compiled = [(f"graphed training step, compiled model: {precision}, {batch_text(args.ids, args.instances)} images",
                 lambda: bench_graph_step(args, args.e2e_dtype, args.ids, compiled=True))]
    return runs, compiled if args.graph_compiled else []


def planned_runs(args, root, notes):
    """(title, function returning rows) of every measurement the chosen stages make, in order."""
    runs = []
    if "loader" in args.stages:
        runs.append(("loader", lambda: bench_loader(args, root)))
        if args.gpu_augment:
            runs.append((f"loader, decode+augment on {args.device.type}", lambda: bench_device_loader(args, root)))
    steps = [((f"training step: {precision_text(dtype, args.device, compiled, args.compile_mode)}, "
               f"{batch_text(num_ids, args.instances)} images"),
              lambda d=dtype, c=compiled, n=num_ids: bench_step(args, d, c, n, notes))
             for dtype, compiled, num_ids in step_configs(args)] if "step" in args.stages else []
    graphed, graphed_compiled = graph_runs(args, notes) if "step" in args.stages else ([], [])
    runs += steps[:len(args.dtypes)] + graphed  # the rest (compiled, larger batch) are slow: they go last
    if "e2e" in args.stages:
        runs.append(("end to end, CPU loader", lambda: bench_end_to_end(args, root)))
        if args.gpu_augment:
            runs.append((f"end to end, decode+augment on {args.device.type}",
                         lambda: bench_end_to_end(args, root, device_augment=True)))
        if args.gpu_augment and graph_supported(args.device, amp_for(args.e2e_dtype, args.device)[0])[0]:
            runs.append((f"end to end, decode+augment on {args.device.type}, CUDA-graphed step",
                         lambda: bench_end_to_end(args, root, device_augment=True, graph=True)))
    single_run_stages = {"features": ("feature extraction", lambda: bench_features(args, root)),
                         "metrics": ("evaluator", lambda: bench_metrics(args)),
                         "large-gallery": ("evaluator on a large gallery", lambda: bench_large_gallery(args, notes)),
                         "centroids": ("centroid evaluation protocols", lambda: bench_centroids(args)),
                         "search": ("retrieval search", lambda: bench_search(args, notes)),
                         "preflight": ("the pre-flight image check", lambda: bench_preflight(args, root)),
                         "losses": ("the four losses against the model", lambda: bench_losses(args)),
                         "rerank": ("k-reciprocal re-ranking", lambda: bench_rerank(args)),
                         "report": ("the HTML evaluation report", lambda: bench_report(args))}
    runs += [single_run_stages[stage] for stage in single_run_stages if stage in args.stages]
    return runs + steps[len(args.dtypes):] + graphed_compiled


def run_stages(args, root, meta, rows, notes):
    """Run every measurement, printing rows as they come and rewriting the JSON after each one.

    A measurement that fails (out of memory, torch.compile without a working compiler ...) becomes a note,
    and the others still run: returns the number of failures."""
    failures = 0
    for title, measure in planned_runs(args, root, notes):
        print(f"== {title}", flush=True)
        start = time.perf_counter()
        try:
            new_rows = measure()
        except (RuntimeError, DataError, OSError, ValueError, AssertionError) as err:
            traceback.print_exc()
            notes.append(f"{title}: failed after {time.perf_counter() - start:.0f} s: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}")
            print(f"  FAILED: {notes[-1]}", flush=True)
            failures, new_rows = failures + 1, []
        free_caches(args.device)
        rows.extend(new_rows)
        for r in new_rows:
            print(f"  {r['figure']}: {format_value(r['value'], r['unit'])} {r['unit']} "
                  f"({r['dtype']}, batch {r['batch']}, input {r['input']})", flush=True)
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
        write_bench_json(args.json, meta, rows, notes)
    return failures


def describe_bench(args):
    """The conditions every figure shares: device, versions, threads, date."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device_name(args.device), "preset": args.preset, "model": args.model,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "loader_workers": args.workers, "note": args.note, "load_average": os.getloadavg()[0],
            "command": "python bench.py " + " ".join(sys.argv[1:])}


@utils.command
def main(argv=None):
    """Run the bench; print the table (and write the JSON). Returns the exit code: 1 when a stage failed."""
    args = resolve_config(get_args_parser().parse_args(argv))
    if args.ids < 1 or args.instances < 2:
        raise utils.UserError(f"--ids {args.ids} --instances {args.instances}: need P >= 1 and K >= 2")
    if args.model not in ARCHS:
        raise utils.UserError(f"--model {args.model}: choose one of {', '.join(ARCHS)}")
    if min(args.size + args.loader_size) < 16 or min(args.rounds, args.steps, args.warmup, args.centroid_rounds) < 1:
        raise utils.UserError("--size/--loader-size need at least 16 pixels a side; --rounds, --steps, --warmup and "
                              "--centroid-rounds at least 1")
    if args.centroid_dim < 1:
        raise utils.UserError(f"--centroid-dim {args.centroid_dim}: need at least 1")
    meta, rows, notes = describe_bench(args), [], []
    if args.busy:
        notes.append(f"the CPU was busy when the bench started (load average {meta['load_average']:.1f} on "
                     f"{meta['cpu_cores']} cores): figures are lower than on an idle machine; the main process used "
                     f"{plural(torch.get_num_threads(), 'torch thread')} (--threads sets it; on busy cores several "
                     "threads make every parallel op wait for descheduled threads)")
    print(f"bench: {meta['device']}, preset {args.preset}, {args.model}, torch {meta['torch']}"
          + (f"\n{args.note}" if args.note else ""), flush=True)
    start = time.perf_counter()
    status = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            needs_data = {"loader", "e2e", "features", "preflight"} & set(args.stages)
            root = synthetic_data_folder(args, tmp) if needs_data else None
            status = 1 if run_stages(args, root, meta, rows, notes) else 0
    except KeyboardInterrupt:  # e.g. a time limit: report what was measured
        notes.append(f"interrupted after {time.perf_counter() - start:.0f} s: the stages not in the table were not run")
        status = 130
    rows.sort(key=lambda r: STAGES.index(r["stage"]))  # stable: each stage's rows in the order measured
    meta["seconds"] = time.perf_counter() - start
    write_bench_json(args.json, meta, rows, notes)
    print(f"\n{meta['device']}, {args.model}, torch {meta['torch']}, {meta['date']}, "
          f"{meta['seconds']:.0f} s" + (f" — {args.note}" if args.note else ""))
    print(format_bench_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        print(f"JSON: {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
