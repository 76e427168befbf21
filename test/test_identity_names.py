"""One parser of identities and cameras from names (data.camera_of, data.identity_pid): a folder data set gets
the same pids and camids from the evaluation's reader (data.read_dataset) as from retrieve.py's embedding path,
whichever of its folders retrieve.py embeds."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
from data import camera_of, identity_pid, read_dataset
from model import build_model
from support.utils import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (64, 32)
# split -> identity folder -> cameras of its images: numeric and non-numeric names, camera numbers with a gap
# (c1, c2, c4), identities only in the query (carol) or only in the gallery (bob, dave)
LAYOUT = {
    "train": {"0001": (1, 2), "walker": (2, 4)},
    "query": {"0003": (1,), "alice": (2,), "carol": (4,), "12": (1,)},
    "gallery": {"0003": (2, 4), "alice": (1, 4), "bob": (1, 2), "12": (2,), "dave": (4,)},
}


def write_folder_dataset(root, layout=LAYOUT):
    """ROOT/{train,query,gallery}/<identity>/img<i>_c<N>.jpg, tiny images of random colours."""
    rng = np.random.default_rng(0)
    for split, identities in layout.items():
        for identity, cameras in identities.items():
            os.makedirs(os.path.join(root, split, identity))
            for i, camera in enumerate(cameras):
                pixels = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, identity, f"img{i}_c{camera}.jpg"))
    return str(root)


def test_cameras_count_from_c1_and_names_without_one_have_none():
    assert camera_of("data/0002_c3s1_000451_03.jpg") == 2
    assert camera_of("photos/alice/img7_c12.jpg") == 11
    assert camera_of("photos/alice/holiday.jpg") == -1
    with pytest.raises(DataError, match="numbered from c1"):
        camera_of("photos/alice/img_c0.jpg")


def test_an_identity_pid_depends_on_the_name_only():
    assert identity_pid("0002") == identity_pid("2") == 2  # Market-style folders keep their number
    assert identity_pid("") == 0  # no identity
    names = ["alice", "bob", "0", "Alice", "walker 2"]
    pids = [identity_pid(name) for name in names]
    assert len(set(pids)) == len(names) and min(pids) >= 2**62 and max(pids) < 2**63
    # the same in another process with another string hash seed: embeddings saved by one run match another's
    code = f"import data; print([data.identity_pid(n) for n in {names!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(pids)


def labels_by_path(items):
    """{path: (pid, camid)} of (path, pid, camid) items."""
    return {path: (int(pid), int(camid)) for path, pid, camid in items}


def test_evaluation_and_retrieval_give_a_folder_the_same_pids_and_camids(tmp_path):
    root = write_folder_dataset(tmp_path / "people")
    dataset = read_dataset("folder", root)
    torch.manual_seed(0)
    model = build_model("resnet18", dataset["num_train_pids"]).eval()
    for split in ("query", "gallery"):  # embedded separately, as `retrieve.py embed` is run per folder
        items = retrieve.collect_images([os.path.join(root, split)])
        emb = retrieve.embed_to_file(model, items, str(tmp_path / f"{split}.pt"), torch.device("cpu"),
                                     retrieve.model_embed_spec(model, SIZE))
        embedded = labels_by_path(zip(emb["paths"], emb["pids"].tolist(), emb["camids"].tolist()))
        assert embedded == labels_by_path(dataset[split])
    query, gallery = labels_by_path(dataset["query"]), labels_by_path(dataset["gallery"])
    pid_of = {os.path.basename(os.path.dirname(path)): pid for path, (pid, _) in {**query, **gallery}.items()}
    assert pid_of["0003"] == 3 and pid_of["12"] == 12
    assert len(set(pid_of.values())) == len(pid_of)  # carol (query only), bob and dave (gallery only) included
    assert {camid for _, camid in {**query, **gallery}.values()} == {0, 1, 3}  # c1, c2, c4


def test_a_folder_set_refuses_names_that_clash_or_camera_c0(tmp_path):
    clash = {"train": {"a": (1, 2)}, "query": {"1": (1,)}, "gallery": {"0001": (2,)}}
    with pytest.raises(DataError, match="same pid 1"):
        read_dataset("folder", write_folder_dataset(tmp_path / "clash", clash))
    c0 = {"train": {"a": (1, 2)}, "query": {"b": (0,)}, "gallery": {"b": (1,)}}
    with pytest.raises(DataError, match="numbered from c1"):
        read_dataset("folder", write_folder_dataset(tmp_path / "c0", c0))
