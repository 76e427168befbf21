"""export.py: ONNX export of the eval-mode embedding model, checked against PyTorch with onnxruntime."""
import os
import re
import sys

import pytest
import torch

import export
from model import build_model

SIZE = (64, 32)


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory):
    """A resnet18 checkpoint whose BatchNorm running statistics are not the defaults, and some 64x32 images."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    with torch.no_grad():  # train-mode passes move the running stats: eval and train outputs now differ
        for _ in range(3):
            model(torch.randn(8, 3, *SIZE) * 2 + 0.5)
    path = tmp / "r18.pth"
    torch.save({"model": model.state_dict(), "model_name": "resnet18", "num_classes": 10, "last_stride": 1,
                "stem_relu": True, "config": {"INPUT.SIZE_TEST": list(SIZE), "INPUT.PIXEL_MEAN": [0.5, 0.4, 0.3],
                                               "INPUT.PIXEL_STD": [0.2, 0.25, 0.3]}}, path)
    return {"path": str(path), "images": os.path.join(synthetic_root, "synthetic", "query"), "tmp": tmp}


@pytest.fixture(scope="module")
def exported(checkpoint):
    """export.main on the checkpoint with the check on real images; (exit status, onnx path)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = str(checkpoint["tmp"] / "model.onnx")
    return export.main([checkpoint["path"], out, "--check-images", checkpoint["images"]]), out


def test_onnx_matches_pytorch_on_real_images(checkpoint, exported, capsys):
    status, out = exported
    assert status == 0 and os.path.isfile(out) and not os.path.exists(out + ".data")  # one self-contained file
    model = export.load_model(checkpoint["path"])
    images = export.comparison_images(checkpoint["images"], count=5, size=SIZE)
    assert export.check_onnx(model, out, images) < 1e-4
    # the graph is the eval-mode model: train-mode outputs (batch statistics) are far from it
    model.train()
    with torch.no_grad():
        train_mode = model(images)[0]
    model.eval()
    with torch.no_grad():
        assert (train_mode - model(images)).abs().max() > 1e-2


def test_batch_axis_is_dynamic_and_output_is_the_embedding(exported):
    import onnxruntime
    session = onnxruntime.InferenceSession(exported[1], providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    assert not isinstance(batch_dim, int)  # symbolic
    for batch in (1, 3, 7):
        out = session.run(["embeddings"], {"images": torch.randn(batch, 3, *SIZE).numpy()})[0]
        assert out.shape == (batch, 512)


def test_the_file_records_its_input_contract_from_the_checkpoint(exported):
    import onnx
    contract = {p.key: p.value for p in onnx.load(exported[1]).metadata_props}
    assert contract["input_size"] == "64 32"
    assert contract["pixel_mean"] == "0.5 0.4 0.3" and contract["pixel_std"] == "0.2 0.25 0.3"


def test_generated_check_images_when_no_folder_is_given():
    images = export.comparison_images(None, count=6, size=SIZE)
    assert images.shape == (6, 3, *SIZE) and images.std() > 0.1


def test_missing_optional_package_names_it_and_the_install_command(checkpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert export.main([checkpoint["path"], str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "onnxruntime" in err and export.INSTALL_HINT in err


def test_checkpoint_of_another_architecture_is_refused(checkpoint, tmp_path, capsys):
    assert export.main([checkpoint["path"], str(tmp_path / "m.onnx"), "--arch", "resnet50", "--no-check"]) == 2
    assert re.search("holds a resnet18 model .* --arch asks for resnet50", capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "m.onnx")
