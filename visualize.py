"""Pictures and logs of runs: ranked lists and CMC curves (evaluate.py / retrieve.py --visualize), the training
curves of a run (curves.png from metrics.jsonl) and TensorBoard scalars.

    python visualize.py curves OUTPUT_DIR          # OUTPUT_DIR/metrics.jsonl -> OUTPUT_DIR/curves.png

matplotlib draws the pictures and tensorboard writes the logs; both are optional: without one, a line says
how to install it (once) and the rest goes on (drawing functions return None, open_tensorboard returns None).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps

from support import utils
from support.metrics import CameraRule, removed_items

GREEN, RED, GREY, DARK = (0, 170, 0), (215, 25, 25), (150, 150, 150), (40, 40, 40)
METRICS = ("mAP", "rank1", "rank5", "rank10", "mINP")  # metrics.jsonl keys, optionally with a 'centroid_' prefix
LOSS_KEYS = ("loss", "loss_centroid_triplet", "loss_triplet", "loss_xent", "loss_center")
_SAID = set()


def say_once(key, message):
    """Print message to stderr the first time key is seen in this process."""
    if key not in _SAID:
        _SAID.add(key)
        print(message, file=sys.stderr, flush=True)


def figure_class():
    """matplotlib's Figure (no pyplot: no global state, nothing to close), or None when it is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        say_once("matplotlib", "matplotlib is not installed, so no pictures are drawn: pip install matplotlib")
        return None
    return Figure


def _save(fig, out_path):
    """Write fig as a PNG (creating the folder); returns out_path."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


# ---------------------------------------------------------------------------------------------------
# Ranked lists

def _framed_tile(path, colour, tile, border=4):
    """The image at path resized into a tile (h, w) with a border of colour; grey when it cannot be read."""
    h, w = tile
    try:
        with Image.open(path) as image:
            inner = image.convert("RGB").resize((w - 2 * border, h - 2 * border), Image.BILINEAR)
    except (OSError, ValueError):
        inner = Image.new("RGB", (w - 2 * border, h - 2 * border), (230, 230, 230))
    return np.asarray(ImageOps.expand(inner, border=border, fill=colour))


def ranked_list_figure(query_path, result_paths, query_label="", result_labels=(), distances=(), tile=(128, 64)):
    """Figure: the query, then its results left to right, each under its rank and above its distance and label;
    a result is framed green when its label is the query's, red when not, grey when the query has no label."""
    Figure = figure_class()
    if Figure is None:
        return None
    h, w = tile
    step, gap, top, bottom, dpi = w + 36, 24, 22, 40, 100  # pixels: a column per tile, wider after the query
    width = 12 + gap + step * (len(result_paths) + 1)
    fig = Figure(figsize=(width / dpi, (top + h + bottom) / dpi), dpi=dpi)
    tiles = [(query_path, "query", "", query_label, DARK)]
    for rank, path in enumerate(result_paths):
        label = result_labels[rank] if rank < len(result_labels) else ""
        colour = GREY if not query_label else GREEN if label == query_label else RED
        dist = f"d = {distances[rank]:.3f}" if rank < len(distances) else ""
        tiles.append((path, f"#{rank + 1}", dist, label, colour))
    for i, (path, head, dist, label, colour) in enumerate(tiles):
        x = 12 + step * i + (gap if i else 0) + (step - w) // 2
        ax = fig.add_axes((x / width, bottom / (top + h + bottom), w / width, h / (top + h + bottom)))
        ax.imshow(_framed_tile(path, colour, tile), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(head, fontsize=9, pad=3, fontweight="bold" if i == 0 else "normal")
        ax.text(0.5, -0.04, dist, transform=ax.transAxes, ha="center", va="top", fontsize=8)
        label = f"id {label if len(label) <= 14 else label[:13] + '…'}" if label else "no id"  # fits the column
        ax.text(0.5, -0.04 - (12 / h if dist else 0), label, transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color=tuple(c / 255 for c in colour))
    return fig


def draw_ranked_list(query_path, result_paths, out_path, query_label="", result_labels=(), distances=(),
                     tile=(128, 64)):
    """ranked_list_figure as a PNG at out_path; returns out_path (None without matplotlib)."""
    fig = ranked_list_figure(query_path, result_paths, query_label, result_labels, distances, tile)
    return None if fig is None else _save(fig, out_path)


def draw_query_results(results, out_dir, limit=50):
    """One ranked-list PNG per query (the first `limit`) from retrieve.query_results(); returns the paths."""
    paths = []
    for i, r in enumerate(results[:limit]):
        stem = os.path.splitext(os.path.basename(r["query"]))[0]
        path = draw_ranked_list(r["query"], [h["path"] for h in r["results"]],
                                os.path.join(out_dir, f"query_{i:04d}_{stem}.png"), r["identity"],
                                [h["identity"] for h in r["results"]], [h["distance"] for h in r["results"]])
        if path is None:
            return paths
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# CMC curves and evaluation pictures

def cmc_figure(curves, title="CMC"):
    """Figure of CMC curves {label: cmc (fractions, rank 1 first)} in %, each legend entry with its R1 / R5 / R10."""
    Figure = figure_class()
    if Figure is None:
        return None
    from matplotlib.ticker import MaxNLocator, PercentFormatter
    fig = Figure(figsize=(6.4, 4.4 + 0.2 * len(curves)), dpi=100, layout="constrained")
    ax = fig.subplots()
    for label, cmc in curves.items():
        cmc = np.asarray(cmc, dtype=float) * 100
        at = ", ".join(f"R{r} {cmc[r - 1]:.1f}%" for r in (1, 5, 10) if r <= len(cmc))
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker="o" if len(cmc) <= 20 else None, markersize=3,
                label=f"{label}: {at}")
    ax.set(xlabel="rank r", ylabel="queries with a true match in the top r", title=title)
    ax.set_xlim(1, max(2, max(len(c) for c in curves.values())))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=9)  # below the axes: never over a curve
    return fig


def draw_cmc_curve(curves, out_path, title="CMC"):
    """cmc_figure as a PNG at out_path; returns out_path (None without matplotlib)."""
    fig = cmc_figure(curves, title)
    return None if fig is None else _save(fig, out_path)


def visualize_evaluation(query, gallery, paths, out_dir, results=None, top_k=5, limit=50, camera_agnostic=False):
    """evaluate.py --visualize: ranked lists of the first `limit` queries of the query Split over the gallery Split
    (paths: their image files, (query paths, gallery paths)), the protocol's same identity + camera removed
    (metrics.removed_items), and cmc.png given evaluate_features' results."""
    q_paths, g_paths = paths[0][:limit], paths[1]
    q_pids, q_cams = (torch.as_tensor(x)[:limit] for x in (query.pids, query.camids))
    g_pids, g_cams = (torch.as_tensor(x) for x in (gallery.pids, gallery.camids))
    normalize = torch.nn.functional.normalize  # ranks by cosine: the evaluator's order with TEST.FEAT_NORM on
    sims = normalize(query.feats[:limit].float(), dim=1) @ normalize(gallery.feats.float(), dim=1).T  # [q, N]
    removed = removed_items(q_pids[:, None], q_cams[:, None], g_pids[None, :], g_cams[None, :],
                            CameraRule(agnostic=camera_agnostic))
    sims.masked_fill_(removed, float("-inf"))
    top_sims, top_idx = sims.topk(min(top_k, sims.shape[1]), dim=1)
    label = lambda pid: str(pid) if pid > 0 else ""  # noqa: E731  (pid 0: distractor, no identity)
    written = []
    for i, (path, pid) in enumerate(zip(q_paths, q_pids.tolist())):
        kept = top_idx[i][top_sims[i] > float("-inf")].tolist()
        dists = (2 - 2 * top_sims[i][:len(kept)]).clamp(min=0).sqrt().tolist()
        name = f"query_{i:04d}_{os.path.splitext(os.path.basename(path))[0]}.png"
        written.append(draw_ranked_list(path, [g_paths[j] for j in kept], os.path.join(out_dir, name), label(pid),
                                        [label(int(g_pids[j])) for j in kept], dists))
    if results is not None:
        rows = [(key, res) for key, res in results.items() if key.startswith("centroid") and res is not None]
        curves = {"per image": results["image"]["cmc"]} if results.get("image") is not None else {}
        curves.update({f"centroid {res.get('protocol', key)}" if len(rows) > 1 else "centroid": res["cmc"]
                       for key, res in rows})  # one curve per centroid protocol evaluated
        if curves:
            written.append(draw_cmc_curve(curves, os.path.join(out_dir, "cmc.png"),
                                          "CMC: share of queries with a true match in the top r"))
    return [p for p in written if p is not None]


# ---------------------------------------------------------------------------------------------------
# Training curves from metrics.jsonl

def read_metrics(path):
    """The rows of a metrics.jsonl file (a folder means its metrics.jsonl). A line that is not JSON (say, cut
    short by a killed run) is skipped with a warning; ValueError when the file is missing or has no rows."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (train.py writes OUTPUT_DIR/metrics.jsonl after each epoch)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                print(f"warning: {path} line {number} is not JSON ({err.msg}): skipped", file=sys.stderr)
    rows = [r for r in rows if isinstance(r, dict) and "epoch" in r]
    if not rows:
        raise ValueError(f"{path} holds no epoch rows yet: train at least one epoch")
    return rows


def _series(rows, key):
    """(epochs, values) of the rows that have key (finite values only)."""
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [e for e, _ in points], [v for _, v in points]


def _panel(ax, rows, keys, scale=1.0, log=False):
    """Plot each key of keys present in rows on ax; returns how many were drawn."""
    drawn = 0
    for key, label in keys:
        epochs, values = _series(rows, key)
        if log:  # a log axis cannot show 0 (a loss term that is switched off)
            kept = [(e, v) for e, v in zip(epochs, values) if v > 0]
            epochs, values = [e for e, _ in kept], [v for _, v in kept]
        if epochs:
            ax.plot(epochs, np.asarray(values) * scale, marker="o" if len(epochs) <= 30 else None, markersize=3,
                    label=label)
            drawn += 1
    if log and drawn:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return drawn


def exact_label(value):
    """value in scientific notation with the fewest digits that still write it (to 1e-6): '5e-05', '5.5e-05'."""
    label = f"{value:e}"
    for digits in range(7):
        label = f"{value:.{digits}e}"
        if abs(float(label) - value) <= 1e-6 * abs(value):
            break
    return label


def _lr_locator(ax):
    """Log ticks at 1, 2 and 5 per decade; where fewer than two of them fall in the view (the lr spans less than
    a factor ~2.5), up to five linear ticks at round values, which exact_label tells apart."""
    from matplotlib.ticker import LogLocator, MaxNLocator
    low, high = ax.get_ylim()
    if low > 0:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        if sum(low <= m * 10.0**k <= high for k in decades for m in (1, 2, 5)) < 2:
            return MaxNLocator(nbins=4, steps=[1, 2, 5, 10])
    return LogLocator(subs=(1.0, 2.0, 5.0))


def curves_figure(rows):
    """Figure of metrics.jsonl rows: loss terms, learning rate and mAP / R1 (per image and per centroid) per epoch."""
    Figure = figure_class()
    if Figure is None:
        return None
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter
    fig = Figure(figsize=(9, 9), dpi=100, layout="constrained")
    loss_ax, lr_ax, acc_ax = fig.subplots(3, 1, sharex=True)
    names = {"loss": "total", "loss_centroid_triplet": "centroid triplet", "loss_triplet": "triplet",
             "loss_xent": "cross-entropy", "loss_center": "center"}
    _panel(loss_ax, rows, [(k, names[k]) for k in LOSS_KEYS], log=True)
    loss_ax.set(title="training losses (epoch means, log scale)", ylabel="loss")
    _panel(lr_ax, rows, [("lr", "learning rate")], log=True)
    lr_ax.set(title="learning rate (log scale)", ylabel="lr")
    lr_ax.yaxis.set_major_locator(_lr_locator(lr_ax))
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: exact_label(v)))
    lr_ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    evaluated = _panel(acc_ax, rows, [("mAP", "mAP per image"), ("rank1", "R1 per image"),
                                      ("centroid_mAP", "mAP per centroid"), ("centroid_rank1", "R1 per centroid")],
                       scale=100)
    acc_ax.set(title="evaluation" + ("" if evaluated else ": none yet (every SOLVER.EVAL_PERIOD epochs)"),
               ylabel="mAP, R1", xlabel="epoch")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, acc_ax):  # legends beside the panels: never over a curve
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def plot_curves(metrics_jsonl_path, out_png):
    """OUTPUT_DIR/curves.png from OUTPUT_DIR/metrics.jsonl (a folder or the file); returns out_png (None without
    matplotlib). ValueError when there is no file or no row."""
    fig = curves_figure(read_metrics(metrics_jsonl_path))
    return None if fig is None else _save(fig, out_png)


# ---------------------------------------------------------------------------------------------------
# TensorBoard

def open_tensorboard(log_dir):
    """A torch.utils.tensorboard SummaryWriter on log_dir, or None when tensorboard is not installed (said once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say_once("tensorboard", "tensorboard is not installed, so nothing is logged for TensorBoard: "
                                "pip install tensorboard")
        return None
    return SummaryWriter(log_dir=log_dir)


def scalar_tags(record):
    """[(tag, value)] of a metrics.jsonl row: loss/<term>, train/<lr, images_per_s, ...>, image/<metric> and
    <prefix>/<metric> for prefixed metrics (centroid/mAP ...); non-numbers and the epoch are left out."""
    tags = []
    for key, value in record.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        prefix, _, metric = key.rpartition("_")
        if key == "loss":
            tag = "loss/total"
        elif key.startswith("loss_"):
            tag = "loss/" + key[len("loss_"):]
        elif key in METRICS:
            tag = "image/" + key
        elif metric in METRICS and prefix:
            tag = f"{prefix}/{metric}"
        else:
            tag = "train/" + key
        tags.append((tag, float(value)))
    return tags


def log_scalars(writer, step, record):
    """Write every number of a metrics.jsonl row (see scalar_tags) at step, then flush; no-op without a writer."""
    if writer is None:
        return
    for tag, value in scalar_tags(record):
        writer.add_scalar(tag, value, step)
    writer.flush()  # once an epoch: TensorBoard shows the epoch while training goes on


def log_config_text(writer, yaml_text):
    """Write the run's configuration (YAML text) once, as a code block under the 'config' text tag."""
    if writer is None:
        return
    writer.add_text("config", "\n".join("    " + line for line in yaml_text.splitlines()), 0)
    writer.flush()


# ---------------------------------------------------------------------------------------------------
# Command line

@utils.command
def main(argv=None):
    """`python visualize.py curves OUTPUT_DIR`: redraw OUTPUT_DIR/curves.png from OUTPUT_DIR/metrics.jsonl; returns
    the exit code (2 and one `error: ...` line when there is nothing to draw or no matplotlib)."""
    parser = argparse.ArgumentParser(description="Pictures of a run.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curves", help="OUTPUT_DIR/metrics.jsonl -> OUTPUT_DIR/curves.png (losses, lr, mAP, R1)")
    p.add_argument("output_dir", help="a train.py OUTPUT_DIR (or a metrics.jsonl file)")
    p.add_argument("-o", "--out", help="PNG to write (default: curves.png beside metrics.jsonl)")
    args = parser.parse_args(argv)
    folder = args.output_dir if os.path.isdir(args.output_dir) else os.path.dirname(args.output_dir)
    out = args.out or os.path.join(folder, "curves.png")
    try:
        drawn = plot_curves(args.output_dir, out)
    except ValueError as err:
        raise utils.UserError(str(err)) from None
    if drawn is None:
        raise utils.UserError("drawing curves.png needs matplotlib: pip install matplotlib")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
