"""visualize.py: ranked lists framed by label, CMC and training-curve pictures whose text is whole and apart,
`visualize.py curves`, TensorBoard scalars read back from the event file, and the paths without matplotlib or
tensorboard."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visualize
from support.metrics import Split

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402


def visible_texts(fig):
    """[(text, window box)] of every non-empty text fig draws (titles, texts, legends, shown ticks, axis labels)."""
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # applies the layout
    texts = list(fig.texts) + [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                texts += [axis.label] + [label for tick in axis._update_ticks() for label in (tick.label1, tick.label2)]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def assert_text_apart_and_inside(fig):
    """No two texts overlap, and none sticks out of the picture."""
    texts = visible_texts(fig)
    for i, (a, box_a) in enumerate(texts):
        assert fig.bbox.contains(box_a.x0 + 0.5, box_a.y0 + 0.5), a
        assert fig.bbox.contains(box_a.x1 - 0.5, box_a.y1 - 0.5), a
        for b, box_b in texts[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)
    return [t for t, _ in texts]


@pytest.fixture()
def images(tmp_path):
    """Five plain light-grey 128x64 images (no pixel has a frame colour)."""
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.new("RGB", (64, 128), (200 + 5 * i, 200, 200)).save(paths[-1])
    return paths


def frame_colours(png):
    """Frame colours of the tiles left to right, read along the picture's middle row."""
    row = np.asarray(Image.open(png).convert("RGB"))[Image.open(png).height // 2]
    named = {visualize.GREEN: "green", visualize.RED: "red", visualize.GREY: "grey", visualize.DARK: "dark"}
    runs = []
    for pixel in map(tuple, row):
        name = named.get(pixel)
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    borders = [name for name, length in runs if name and length >= 2]
    assert len(borders) % 2 == 0, borders  # a left and a right border per tile
    return borders[::2]


def test_ranked_lists_are_framed_by_label_with_whole_text(images, tmp_path):
    results = [{"query": images[0], "identity": "7", "results": [
        {"path": images[1], "identity": "7", "distance": 0.483}, {"path": images[2], "identity": "8", "distance": 0.5},
        {"path": images[3], "identity": "", "distance": 0.61}, {"path": images[4], "identity": "7", "distance": 1.2}]},
        {"query": images[1], "identity": "", "results": [{"path": images[2], "identity": "8", "distance": 0.2}]}]
    pngs = visualize.draw_query_results(results, str(tmp_path / "vis"))
    assert [p.rsplit("/", 1)[1] for p in pngs] == ["query_0000_img_0.png", "query_0001_img_1.png"]
    assert frame_colours(pngs[0]) == ["dark", "green", "red", "red", "green"]
    assert frame_colours(pngs[1]) == ["dark", "grey"]  # an unlabelled query: nothing to judge
    fig = visualize.ranked_list_figure(images[0], images[1:] * 3, "7", ["7", "8", "", "a-very-long-identity-name"] * 3,
                                       [0.483, 10.5, 0.61, 1.2] * 3)
    texts = assert_text_apart_and_inside(fig)
    assert "#10" in texts and "d = 0.483" in texts and "d = 10.500" in texts  # spaces kept, rank 10 apart
    assert "id 7" in texts and "no id" in texts and "id a-very-long-i…" in texts
    missing = visualize.draw_ranked_list(str(tmp_path / "gone.jpg"), [], str(tmp_path / "one.png"))
    assert frame_colours(missing) == ["dark"]  # an unreadable image is a grey tile, not an error


@pytest.mark.parametrize("camera_agnostic", [False, True])
def test_evaluation_lists_leave_out_what_the_protocol_removes(monkeypatch, tmp_path, camera_agnostic):
    gen = torch.Generator().manual_seed(0)
    pids, cams = torch.randint(1, 4, (12,), generator=gen), torch.randint(0, 2, (12,), generator=gen)
    split, paths = Split(torch.randn(12, 8, generator=gen), pids, cams), [f"img_{i}.jpg" for i in range(12)]
    drawn = []
    monkeypatch.setattr(visualize, "draw_ranked_list", lambda query, found, out, *_: drawn.append(found) or out)
    visualize.visualize_evaluation(split, split, (paths, paths), str(tmp_path), top_k=12, limit=12,
                                   camera_agnostic=camera_agnostic)
    removed = (pids[:, None] == pids[None, :]) & (cams[:, None] == cams[None, :]) & (not camera_agnostic)
    assert bool(removed.any()) != camera_agnostic  # each query removes at least itself unless camera-agnostic
    for i, found in enumerate(drawn):  # top 12 of 12: every kept gallery image, nothing removed
        assert sorted(found) == sorted(paths[j] for j in range(12) if not removed[i, j])


def test_cmc_picture_has_percent_axes_and_whole_legend(tmp_path):
    curves = {"per image": np.linspace(0.775, 0.97, 50), "centroid": np.linspace(0.93, 1.0, 50)}
    fig = visualize.cmc_figure(curves, "CMC: share of queries with a true match in the top r")
    texts = assert_text_apart_and_inside(fig)
    assert any(t.startswith("per image: R1 77.5%, R5 ") for t in texts)
    assert any(t.startswith("centroid: R1 93.0%") for t in texts)
    assert "rank r" in texts and "100%" in texts and "90%" in texts
    path = visualize.draw_cmc_curve(curves, str(tmp_path / "cmc.png"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 480)  # 4.4 in + 0.2 in a legend entry


def fake_run(epochs=12, eval_period=4):
    """metrics.jsonl rows of a run: every loss term, lr, speed each epoch; metrics every eval_period epochs."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "lr": 3.5e-4 * min(1, epoch / 10) * (0.1 if epoch > 8 else 1), "loss": 9 / epoch,
               "loss_centroid_triplet": 0.5 / epoch, "loss_triplet": 0.6 / epoch, "loss_xent": 6 / epoch,
               "loss_center": 300 / epoch, "images_per_s": 340.0 + epoch, "step_time_s": 0.19, "data_time_s": 0.01}
        if epoch % eval_period == 0:
            row.update({f"{prefix}{metric}": 0.5 + epoch / 100 + (0.2 if prefix else 0) + k / 100
                        for prefix in ("", "centroid_") for k, metric in enumerate(visualize.METRICS)})
        rows.append(row)
    return rows


def test_curves_png_from_metrics_jsonl_with_the_command(tmp_path, capsys):
    rows = fake_run()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = visualize.curves_figure(rows)
    assert_text_apart_and_inside(fig)
    loss_ax, lr_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["total", "centroid triplet", "triplet", "cross-entropy",
                                                            "center"]
    assert all(len(line.get_xdata()) == 12 for line in loss_ax.lines + lr_ax.lines)
    plotted = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in acc_ax.lines}
    assert set(plotted) == {"mAP per image", "R1 per image", "mAP per centroid", "R1 per centroid"}
    assert plotted["mAP per centroid"] == ([4, 8, 12], pytest.approx([74, 78, 82]))  # only evaluated epochs, in %
    assert visualize.main(["curves", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width >= 800
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + '{"epoch": 5, "lr')
    capsys.readouterr()
    visualize.main(["curves", str(tmp_path), "-o", str(tmp_path / "cut.png")])  # a run killed while writing a row
    assert "line 5 is not JSON" in capsys.readouterr().err and (tmp_path / "cut.png").exists()
    (tmp_path / "metrics.jsonl").write_text("")
    assert visualize.main(["curves", str(tmp_path)]) == 2
    assert "no epoch rows yet" in capsys.readouterr().err
    assert visualize.main(["curves", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("lrs", [
    [5e-5, 5.5e-5, 6e-5, 6.5e-5, 7e-5],    # within a fraction of a decade: matplotlib's linear ticks
    [6.2e-5, 5.1e-5, 5.9e-5],
    [3.5e-4, 3.6e-4, 3.6e-4],
    [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],  # the demo's warm-up, then its base lr
    [3.5e-5 * epoch for epoch in range(1, 11)] + [3.5e-5] * 4,  # a decade and more: 1, 2, 5 per decade
])
def test_curves_png_lr_ticks_are_distinct_and_name_their_values(lrs):
    rows = [{"epoch": epoch, "lr": lr, "loss": 1.0} for epoch, lr in enumerate(lrs, 1)]
    fig = visualize.curves_figure(rows)
    FigureCanvasAgg(fig).draw()
    lr_ax = fig.axes[1]
    low, high = lr_ax.get_ylim()
    shown = [(label.get_position()[1], label.get_text()) for label in lr_ax.get_yticklabels()
             if low <= label.get_position()[1] <= high and label.get_text()]
    texts = [text for _, text in shown]
    assert len(texts) >= 2 and len(set(texts)) == len(texts), texts  # e.g. not "6e-05" twice
    for value, text in shown:
        assert float(text) == pytest.approx(value, rel=1e-6), (value, text)


def test_without_matplotlib_drawing_says_how_to_install_once_and_goes_on(monkeypatch, tmp_path, images, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(visualize, "_SAID", set())
    assert visualize.draw_ranked_list(images[0], images[1:], str(tmp_path / "r.png"), "7", ["7"]) is None
    assert visualize.draw_cmc_curve({"per image": [0.5, 1.0]}, str(tmp_path / "cmc.png")) is None
    split = Split(torch.eye(4), [i % 2 + 1 for i in range(4)], list(range(4)))
    results = {"image": {"cmc": np.array([0.5, 1.0])}}
    assert visualize.visualize_evaluation(split, split, (images[:4], images[:4]), str(tmp_path / "eval"), results) == []
    (tmp_path / "metrics.jsonl").write_text(json.dumps(fake_run(1)[0]) + "\n")
    assert visualize.main(["curves", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("**/*.png"))[len(images):]  # nothing but the input images
    assert capsys.readouterr().err.count("pip install matplotlib") == 2  # once when drawing, once in the error


def test_tensorboard_scalars_and_config_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = visualize.open_tensorboard(str(tmp_path / "tb"))
    rows = fake_run()
    visualize.log_config_text(writer, "SOLVER:\n  BASE_LR: 0.00035\n")
    for row in rows:
        visualize.log_scalars(writer, row["epoch"], row)
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    metrics = {f"{kind}/{m}" for kind in ("image", "centroid") for m in ("mAP", "rank1", "rank5", "rank10", "mINP")}
    losses = {f"loss/{t}" for t in ("total", "centroid_triplet", "triplet", "xent", "center")}
    timing = {"train/lr", "train/images_per_s", "train/step_time_s", "train/data_time_s"}
    assert set(acc.Tags()["scalars"]) == metrics | losses | timing
    for tag in losses | timing:
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 13))
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("centroid/rank1")] == [(4, 0.75), (8, 0.79), (12, 0.83)]
    assert [e.value for e in acc.Scalars("loss/center")] == pytest.approx([300 / e for e in range(1, 13)])
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(3.5e-5)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "BASE_LR: 0.00035" in text


def test_without_tensorboard_one_line_says_how_to_install(monkeypatch, capsys, tmp_path):
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr(visualize, "_SAID", set())
    assert visualize.open_tensorboard(str(tmp_path)) is None
    assert visualize.open_tensorboard(str(tmp_path)) is None
    visualize.log_scalars(None, 1, fake_run(1)[0])  # the train loop calls on: nothing happens
    visualize.log_config_text(None, "a: 1")
    err = capsys.readouterr().err
    assert err.count("pip install tensorboard") == 1 and len(err.strip().splitlines()) == 1
