"""support/report.py: the evaluation's HTML page on the synthetic set: the header's numbers are evaluate_features'
results, the failures are exactly the queries whose rank-1 is wrong, a cut page says so, evaluate.py --report and
train.py's per-epoch evaluation write it, and a real headless Chromium opens it, runs its script without an error
and filters the failures on a click."""
import base64
import html.parser
import io
import json
import os
import pathlib
import shutil
import subprocess
import time
import types
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from data import item_labels, read_dataset
from support import config, report
from support.centroids import EvaluationOptions, evaluate_centroids, evaluate_features

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class PageParser(html.parser.HTMLParser):
    """What a test reads from a report: the metrics cells, the facts' counts, the failure lines, the page's JSON
    and every tag and link."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tables, self.failures, self.links, self.tags, self.facts = {}, {}, [], [], ""
        self.held = self.total = None
        self.json_text, self._json, self._in_facts = "", False, 0
        self._table = self._row = self._metric = None
        self.feed(text)
        self.close()
        self.data = json.loads(self.json_text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [a[key] for key in ("src", "href") if key in a]
        if tag == "table" and "data-table" in a:
            self._table = self.tables.setdefault(a["data-table"], {})
        elif tag == "tr" and self._table is not None and "data-row" in a:
            self._row = self._table.setdefault(a["data-row"], {})
        elif tag == "td" and self._row is not None:
            self._metric = a.get("data-metric")
        elif tag == "li" and "data-failures" in a:
            self.failures[a["data-ranking"]] = int(a["data-failures"]), int(a["data-unmatched"])
        elif tag == "dl" and "data-held" in a:
            self.held, self.total, self._in_facts = int(a["data-held"]), int(a["data-total"]), 1
        self._json = tag == "script" and a.get("id") == "report-data"

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag == "td":
            self._metric = None
        elif tag == "dl":
            self._in_facts = 0
        self._json = False

    def handle_data(self, data):
        if self._metric:
            self._row[self._metric] = self._row.get(self._metric, "") + data
        if self._json:
            self.json_text += data
        if self._in_facts:
            self.facts += data + " "


@pytest.fixture(scope="module")
def evaluated(synthetic_root):
    """(data, cfg, raw query and gallery embeddings, evaluate_features' results) of an untrained ResNet-18 on the
    synthetic set: a mix of right and wrong rank-1s."""
    model = pytest.importorskip("model")
    data = read_dataset("synthetic", synthetic_root)
    cfg, _, _ = config.parse(["INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    net = model.build_model("resnet18", num_classes=4).eval()
    _, (q_feats, g_feats) = ev.evaluate_splits(net, data, cfg, torch.device("cpu"))
    results = evaluate_features(ev.split_of(data["query"], q_feats), ev.split_of(data["gallery"], g_feats),
                                ev.evaluation_arguments(cfg, data["has_cameras"]), raw_feats=True)
    return data, cfg, net, q_feats, g_feats, results


@pytest.fixture(scope="module")
def page(evaluated, tmp_path_factory):
    """The report of `evaluated`, written by TEST.REPORT as evaluate.py writes it: (path, parsed page)."""
    data, cfg, _, q_feats, g_feats, results = evaluated
    path = str(tmp_path_factory.mktemp("report") / "report.html")
    cfg = cfg.replace({"TEST.REPORT": path})
    assert report.write_config_report(cfg, data, (results, (q_feats, g_feats)), "output/best.pth") == path
    with open(path, encoding="ascii") as f:  # the page is ASCII: no encoding can garble it
        return path, PageParser(f.read())


def rank1_wrong_by_reference(q_feats, g_feats, query, gallery):
    """Names of the queries whose nearest kept gallery image is another identity: a float64 stable argsort per query
    of the L2-normalised embeddings, same identity + camera removed; queries without a true match left out."""
    q = torch.nn.functional.normalize(q_feats.double(), dim=1).numpy()
    g = torch.nn.functional.normalize(g_feats.double(), dim=1).numpy()
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(2)
    (q_pids, q_cams), (g_pids, g_cams) = item_labels(query), item_labels(gallery)
    wrong = set()
    for i, (path, _, _) in enumerate(query):
        kept = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        order = np.argsort(dist[i][kept], kind="stable")
        if (g_pids[kept] == q_pids[i]).any() and g_pids[kept][order[0]] != q_pids[i]:
            wrong.add(os.path.basename(path))
    return wrong, dist


def test_header_numbers_are_evaluate_features_results_and_counts_add_up(page, evaluated):
    data, _, _, _, _, results = evaluated
    _, parsed = page
    assert set(parsed.tables) == {"results"} and set(parsed.tables["results"]) == set(results)
    for key, res in results.items():
        row = parsed.tables["results"][key]
        assert row["mAP"] == f"{100 * res['mAP']:.2f}" and row["mINP"] == f"{100 * res['mINP']:.2f}"
        assert [row[f"R{k}"] for k in (1, 5, 10)] == [f"{100 * res['cmc'][k - 1]:.2f}" for k in (1, 5, 10)]
        assert row["queries"] == str(res["num_valid_queries"])
    assert parsed.held == parsed.total == len(parsed.data["queries"]["name"]) == len(data["query"])
    assert "all 16 queries" in parsed.facts and "output/best.pth" in parsed.facts
    for ranking in parsed.data["rankings"]:
        res = results[ranking["key"]]
        valid = res["num_valid_queries"]
        rank1_wrong = valid - round(res["cmc"][0] * valid)  # what R1 counts
        assert parsed.failures[ranking["key"]] == (rank1_wrong, len(data["query"]) - valid)
        assert sum(first > 1 for first in ranking["first"]) == rank1_wrong
        assert 0 < rank1_wrong < valid  # the test set has both kinds


def test_failures_filter_holds_exactly_the_queries_whose_rank1_is_wrong(page, evaluated):
    data, cfg, _, q_feats, g_feats, _ = evaluated
    _, parsed = page
    names = parsed.data["queries"]["name"]
    by_key = {r["key"]: r for r in parsed.data["rankings"]}
    listed = {key: {names[i] for i, first in enumerate(r["first"]) if first > 1} for key, r in by_key.items()}
    wrong, dist = rank1_wrong_by_reference(q_feats, g_feats, data["query"], data["gallery"])
    assert listed["image"] == wrong
    centroid = evaluate_centroids(ev.split_of(data["query"], q_feats), ev.split_of(data["gallery"], g_feats),
                                  EvaluationOptions(keep_camid_centroids=True), raw_feats=True,
                                  return_per_query=True)["per_query"]
    expected = {names[i] for i in range(len(names)) if centroid["num_matches"][i] > 0 and centroid["first"][i] > 1}
    assert listed["centroid"] == expected
    for r in by_key.values():  # the first tile is framed red exactly for a failure (green for the others)
        assert {names[i] for i, hits in enumerate(r["match"]) if not hits[0]} == listed[r["key"]]
        assert all(len(top) == cfg.TEST.VISUALIZE_TOPK for top in r["top"])
    # the per-image lists are the reference's order, with its Euclidean distances
    (q_pids, q_cams), (g_pids, g_cams) = item_labels(data["query"]), item_labels(data["gallery"])
    image = by_key["image"]
    for i in range(len(names)):
        kept = np.nonzero(~((g_pids == q_pids[i]) & (g_cams == q_cams[i])))[0]
        order = kept[np.argsort(dist[i][kept], kind="stable")][:cfg.TEST.VISUALIZE_TOPK]
        assert [image["entries"]["name"][e] for e in image["top"][i]] == \
            [os.path.basename(data["gallery"][j][0]) for j in order]
        np.testing.assert_allclose(image["dist"][i], np.sqrt(dist[i][order]), atol=2e-4)


def test_page_is_self_contained(page):
    path, parsed = page
    assert parsed.links == [] and "link" not in parsed.tags and "iframe" not in parsed.tags
    assert parsed.tags.count("script") == 2 and parsed.tags.count("svg") == 3  # CMC and two histograms
    with open(path) as f:
        text = f.read()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    for thumb in parsed.data["thumbs"]:
        image = Image.open(io.BytesIO(base64.b64decode(thumb)))
        assert image.format == "JPEG" and image.size == (32, 64)


def test_order_is_the_evaluators_with_ties_by_column():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        dist = torch.randint(-3, 4, (6, 30), generator=gen).float() / 2  # many ties, negatives
        dist[torch.rand(6, 30, generator=gen) < 0.2] = -0.0
        dist[torch.rand(6, 30, generator=gen) < 0.2] = float("inf")
        k = int(torch.randint(1, 12, (1,), generator=gen))
        cols, values = report.nearest_k(dist, k)
        reference = np.argsort(dist.numpy() + 0.0, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(cols.numpy(), reference)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(dist.numpy(), reference, 1))


def checkpoint_file(net, tmp_path):
    """Our checkpoint of the fixture's network."""
    torch.save({"model": net.state_dict(), "model_name": "resnet18", "num_classes": 4, "last_stride": 1,
                "stem_relu": True}, tmp_path / "ckpt.pth")
    return str(tmp_path / "ckpt.pth")


def test_cli_writes_a_cut_re_ranked_report_and_says_so(evaluated, synthetic_root, tmp_path, capsys):
    checkpoint = checkpoint_file(evaluated[2], tmp_path)
    path = tmp_path / "pages" / "report.html"
    common = ["--MODEL.PRETRAIN_PATH", checkpoint, "--DATASETS.NAMES", "synthetic", "--DATASETS.ROOT_DIR",
              synthetic_root, "--DATALOADER.NUM_WORKERS", "0", "--INPUT.SIZE_TEST", "64", "32"]
    results = ev.evaluate_command(common + ["--report", str(path), "--report-limit", "3", "TEST.RERANK", "True",
                                            "TEST.RERANK_K1", "6"])
    assert f"wrote the report {path}" in capsys.readouterr().out
    parsed = PageParser(path.read_text())
    assert (parsed.held, parsed.total) == (3, 16) and "the first 3 of 16 queries (--report-limit" in parsed.facts
    assert len(parsed.data["queries"]["name"]) == 3 and all(len(r["top"]) == 3 for r in parsed.data["rankings"])
    assert set(parsed.tables) == {"plain", "results"} and "k-reciprocal re-ranked distances (k1 6" in parsed.facts
    for key, res in results.items():  # the re-ranked rows are the results, and their failures the lists'
        assert parsed.tables["results"][key]["mAP"] == f"{100 * res['mAP']:.2f}"
        valid = res["num_valid_queries"]
        assert parsed.failures[key][0] == valid - round(res["cmc"][0] * valid)
    # bad input: one error line, exit code 2; a page that cannot be written is an error of the command
    assert ev.main(common + ["--report-limit", "some"]) == 2
    assert "error: --report-limit: TEST.REPORT_LIMIT 'some'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    data, cfg, _, q_feats, g_feats, _ = evaluated
    with pytest.raises(report.ReportError, match="cannot write the report .*file/report.html"):
        report.write_config_report(cfg.replace({"TEST.REPORT": str(tmp_path / "file" / "report.html")}), data,
                                   (results, (q_feats, g_feats)), checkpoint)


def test_training_evaluation_writes_the_report_and_a_failure_only_warns(evaluated, tmp_path, capsys):
    train = pytest.importorskip("train")
    data, cfg, net, _, _, _ = evaluated
    state = types.SimpleNamespace(model=net, amp_dtype=None)
    path = tmp_path / "report.html"
    results = train.evaluate_epoch(state, dict(data), cfg.replace({"TEST.REPORT": str(path)}), torch.device("cpu"),
                                   0, 1)
    parsed = PageParser(path.read_text())
    assert "the model in training" in parsed.facts
    assert parsed.tables["results"]["image"]["mAP"] == f"{100 * results['image']['mAP']:.2f}"
    (tmp_path / "file").write_text("")  # training's page cannot be written: a warning, and training goes on
    assert report.write_config_report(cfg.replace({"TEST.REPORT": str(tmp_path / "file" / "r.html")}), data,
                                      (results, evaluated[3:5])) is None
    assert "warning: cannot write the report" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# A real browser: headless Chromium over the DevTools protocol

def find_chromium():
    """The Chromium to run: $CHROMIUM, Debian's /usr/bin/chromium, or one on PATH; None when there is none."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class DevTools:
    """A small Chrome DevTools Protocol client on one page's websocket: calls, and the events seen meanwhile."""

    def __init__(self, websocket, url):
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.events, self.next_id = [], 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method):
        while not any(event.get("method") == method for event in self.events):
            self.events.append(json.loads(self.ws.recv()))

    def value(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def click(self, element_id):
        """A real mouse click at the middle of the element (scrolled into view first)."""
        x, y = self.value(f"(function () {{ var e = document.getElementById('{element_id}'); e.scrollIntoView("
                          "{block: 'center'}); var r = e.getBoundingClientRect(); "
                          "return [r.left + r.width / 2, r.top + r.height / 2]; }())")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


@pytest.fixture()
def chromium(tmp_path):
    """A DevTools client on a fresh headless Chromium's page (its own profile folder, no network services)."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (/usr/bin/chromium): `make test` installs Debian's chromium package when it "
                    "runs as root with apt; or set CHROMIUM=/path/to/chromium")
    websocket = pytest.importorskip("websocket", reason="websocket-client (requirements-test.txt) talks to Chromium")
    profile = tmp_path / "profile"
    with open(tmp_path / "chromium.log", "w") as log:
        process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                    "--remote-debugging-port=0", "about:blank"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not (profile / "DevToolsActivePort").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "chromium.log").read_text()
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written before it is complete
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        targets = json.load(local.open(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page_target = next(t for t in targets if t["type"] == "page")
        yield DevTools(websocket, page_target["webSocketDebuggerUrl"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def frame_pixels(png):
    """How many pixels of the screenshot have the hit and the miss frame colours."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return [int((pixels == colour).all(1).sum()) for colour in ((0, 170, 0), (215, 25, 25))]


def test_chromium_shows_the_page_and_filters_the_failures_on_a_click(chromium, page, tmp_path):
    path, parsed = page
    names, image = parsed.data["queries"]["name"], parsed.data["rankings"][0]
    failures = {names[i] for i, first in enumerate(image["first"]) if first > 1}
    for domain in ("Runtime", "Log", "Page", "Network"):
        chromium.call(f"{domain}.enable")
    chromium.call("Emulation.setDeviceMetricsOverride", width=1300, height=1000, deviceScaleFactor=1, mobile=False)
    chromium.call("Page.navigate", url=pathlib.Path(path).resolve().as_uri())
    chromium.wait_for("Page.loadEventFired")
    rows = ("Array.from(document.querySelectorAll('#query-rows tr.query-row'))"
            ".map(function (tr) { return tr.dataset.query; })")
    assert sorted(chromium.value(rows)) == sorted(names)  # every query on the first page (25 per page)
    chromium.click("failures-only")
    shown = chromium.value(rows)
    assert sorted(shown) == sorted(failures)
    assert chromium.value("document.getElementById('match-count').dataset.count") == str(len(failures))
    worst = min(failures, key=lambda name: (image["ap"][names.index(name)], names.index(name)))
    assert shown[0] == worst  # sorted by AP, worst first
    chromium.value("window.scrollTo(0, document.getElementById('queries').offsetTop)")
    png = base64.b64decode(chromium.call("Page.captureScreenshot", format="png")["data"])
    assert Image.open(io.BytesIO(png)).size == (1300, 1000)
    hit_pixels, miss_pixels = frame_pixels(png)
    assert hit_pixels > 100 and miss_pixels > 100  # the ranked lists are drawn, framed green and red
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("REPORT_SCREENSHOT"):  # the README's picture: REPORT_SCREENSHOT=docs/report.png pytest ...
        with open(os.environ["REPORT_SCREENSHOT"], "wb") as f:
            f.write(png)
    errors = [e for e in chromium.events if e["method"] == "Runtime.exceptionThrown" or
              e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error" or
              e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in chromium.events if e["method"] == "Network.requestWillBeSent"]
    assert requests and all(url.startswith(("file:", "data:")) for url in requests)  # nothing from the network
