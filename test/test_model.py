"""Model: shapes, BNNeck, IBN-a, stem, and loading/refusing every weight format from files written here."""
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision

import model as model_module
from loss import CenterLoss
from model import (
    ARCHS,
    WeightError,
    _infer_arch,
    build_model,
    load_weights,
    masked_batch_norm,
    model_from_checkpoint,
    stem_relu_message,
)


def images(batch=2, seed=0):
    """A tiny batch of 64x32 inputs."""
    return torch.randn(batch, 3, 64, 32, generator=torch.Generator().manual_seed(seed))


def randomize_bn_stats(module, seed=0):
    """Non-trivial running statistics, so loading them shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return module


@pytest.mark.parametrize("last_stride,map_size", [(1, (4, 2)), (2, (2, 1))])
def test_output_shapes_for_last_stride(last_stride, map_size):
    model = build_model("resnet18", num_classes=7, last_stride=last_stride)
    x = images()
    assert model.backbone(x).shape == (2, 512, *map_size)
    feat, logits = model.train()(x)
    assert feat.shape == (2, 512) and logits.shape == (2, 7)
    assert model.eval()(x).shape == (2, 512)


def test_resnet50_feature_size_and_last_stride_1_map():
    model = build_model("resnet50", num_classes=3)
    assert model.feat_dim == 2048 and model.bn.num_features == 2048
    # 64x32 input: /4 stem, /2 layer2, /2 layer3, /1 layer4 -> 4x2 (a 256x128 input gives 16x8)
    assert model.backbone(images()).shape == (2, 2048, 4, 2)


def test_bnneck_bias_stays_zero_after_optimizer_steps():
    model = build_model("resnet18", num_classes=4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=5e-4)
    weight_before = model.bn.weight.detach().clone()
    for step in range(2):
        feat, logits = model(images(4, seed=step))
        (feat.pow(2).mean() + logits.logsumexp(1).mean() + model.bn(feat).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not model.bn.bias.requires_grad
    assert torch.equal(model.bn.bias, torch.zeros(512))
    assert not torch.equal(model.bn.weight, weight_before)


def test_classifier_is_bias_free_and_initialised_with_std_0_001():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=751)
    assert model.classifier.bias is None
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert abs(model.classifier.weight.mean().item()) < 1e-4


def test_ibn_a_layout_matches_public_ibn_files():
    keys = build_model("resnet50_ibn_a", num_classes=2).state_dict()
    assert keys["backbone.layer1.0.bn1.IN.weight"].shape == (32,)  # half of 64 planes
    assert keys["backbone.layer3.5.bn1.IN.bias"].shape == (128,)
    assert keys["backbone.layer1.0.bn1.BN.running_mean"].shape == (32,)
    assert "backbone.layer4.0.bn1.weight" in keys  # layer4 stays plain BatchNorm
    assert not any(".IN." in k for k in keys if k.startswith("backbone.layer4"))


def test_channels_last_gives_the_same_embedding():
    for name in ("resnet18", "resnet50_ibn_a"):
        model = randomize_bn_stats(build_model(name, num_classes=3)).eval()
        x = images()
        with torch.no_grad():
            plain = model(x)
            model = model.to(memory_format=torch.channels_last)
            last = model(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(plain, last, atol=1e-4)


def test_stem_follows_the_original_unless_forced():
    assert not build_model("resnet18", num_classes=3).stem_relu  # the original's plain ResNets: no ReLU
    assert build_model("resnet50_ibn_a", num_classes=3).stem_relu  # its IBN-a nets keep it
    assert build_model("resnet18", num_classes=3, stem_relu=True).stem_relu
    assert not build_model("resnet50_ibn_a", num_classes=3, stem_relu=False).stem_relu
    without = build_model("resnet18", num_classes=3)
    assert "trained with that ReLU" in stem_relu_message(without, pretrained=True)
    assert stem_relu_message(without, pretrained=False) == ""
    assert stem_relu_message(build_model("resnet18", num_classes=3, stem_relu=True), pretrained=True) == ""


def test_stem_without_relu_changes_the_network():
    torch.manual_seed(0)
    with_relu = build_model("resnet18", num_classes=3, stem_relu=True).eval()
    without = build_model("resnet18", num_classes=3, stem_relu=False).eval()
    without.load_state_dict(with_relu.state_dict())
    assert with_relu.stem_relu and not without.stem_relu
    assert isinstance(without.backbone.relu, nn.Identity)
    with torch.no_grad():
        assert not torch.allclose(with_relu(images()), without(images()))


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_is_read_back_from_weight_keys(name):
    with torch.device("meta"):
        keys = build_model(name, num_classes=2).state_dict()
    assert _infer_arch(keys) == name


def torchvision_file(tmp_path, name="resnet18", legacy=False):
    """A torchvision ImageNet-layout file (fc included); legacy: 2017 format, no num_batches_tracked."""
    torch.manual_seed(1)
    net = randomize_bn_stats(getattr(torchvision.models, name)(weights=None))
    state = net.state_dict()
    path = tmp_path / f"{name}-imagenet.pth"
    if legacy:
        state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(state, path)
    return path, net


@pytest.mark.parametrize("legacy", [False, True])
def test_loads_torchvision_imagenet_file(tmp_path, capsys, legacy):
    path, net = torchvision_file(tmp_path, legacy=legacy)
    model = build_model("resnet18", num_classes=5, pretrain_path=str(path))
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0 and "ImageNet" in summary
    assert "skipped fc.weight, fc.bias" in summary and "fresh bn and classifier" in summary
    for key, value in net.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()["backbone." + key], value), key


def test_loads_ibn_a_imagenet_file_wrapped_with_module_prefix(tmp_path):
    source = randomize_bn_stats(build_model("resnet50_ibn_a", num_classes=2).backbone)
    state = {"module." + k: v for k, v in source.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "r50_ibn_a.pth"
    torch.save({"state_dict": state}, path)
    model = build_model("resnet50_ibn_a", num_classes=3, pretrained=True, pretrain_path=str(path))
    assert torch.equal(model.backbone.layer2[1].bn1.IN.weight, source.layer2[1].bn1.IN.weight)
    assert torch.equal(model.backbone.layer3[0].bn1.BN.running_var, source.layer3[0].bn1.BN.running_var)


def fake_yacs_module():
    """A stand-in for yacs.config so a Lightning-style .ckpt pickles a real CfgNode-like object."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__["__immutable__"] = False  # yacs keeps its flags in __dict__

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    return module


def original_ckpt(tmp_path, num_classes=5, last_stride=2):
    """A file shaped like the original centroids-reid's Lightning checkpoints (resnet18 for speed)."""
    torch.manual_seed(2)
    net = randomize_bn_stats(torchvision.models.resnet18(weights=None))
    state = {"backbone.base." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    neck = randomize_bn_stats(nn.BatchNorm1d(512), seed=3)
    neck.weight.data.uniform_(0.5, 1.5)
    state.update({"bn." + k: v for k, v in neck.state_dict().items()})
    state["fc_query.weight"] = torch.randn(num_classes, 512)
    state["center_loss.centers"] = torch.randn(num_classes, 512)
    yacs = fake_yacs_module()
    sys.modules["yacs"], sys.modules["yacs.config"] = types.ModuleType("yacs"), yacs
    try:
        hparams = {"MODEL": yacs.CfgNode(NAME="resnet18", LAST_STRIDE=last_stride), "num_classes": num_classes}
        ckpt = {"epoch": 119, "global_step": 1000, "pytorch-lightning_version": "1.1.4", "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3.5e-4, "params": [0]}]}],
                "hyper_parameters": hparams}
        path = tmp_path / "market1501_resnet50_256_128_epoch_120.ckpt"
        torch.save(ckpt, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    return path, net, neck, state


def test_loads_original_ckpt_without_its_packages(tmp_path, capsys):
    path, net, neck, state = original_ckpt(tmp_path)
    model = model_from_checkpoint(path)
    summary = capsys.readouterr().out
    assert "original centroids-reid" in summary and "fresh" not in summary
    assert model.name == "resnet18" and model.num_classes == 5 and model.last_stride == 2
    assert not model.stem_relu and not model.training
    assert torch.equal(model.classifier.weight, state["fc_query.weight"])
    # the original's forward: stem without ReLU, layers, average pooling, BNNeck
    net.eval()
    x = images()
    with torch.no_grad():
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.bn1(net.conv1(x)))))))
        expected = neck.eval()(fmap.mean(dim=(2, 3)))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_load_weights_of_original_ckpt_switches_stem_and_loads_centers(tmp_path):
    path, _, _, state = original_ckpt(tmp_path)
    model = build_model("resnet18", num_classes=5, last_stride=2, stem_relu=True)
    center_loss = CenterLoss(5, 512)
    summary = load_weights(model, path, center_loss)
    assert "stem without ReLU" in summary and "+ centers" in summary
    assert not model.stem_relu
    assert torch.equal(center_loss.centers, state["center_loss.centers"])


def our_checkpoint(tmp_path):
    """A checkpoint in train.py's format."""
    torch.manual_seed(3)
    source = randomize_bn_stats(build_model("resnet18", num_classes=7, last_stride=2, stem_relu=False))
    center_loss = CenterLoss(7, 512)
    optimizer = torch.optim.Adam(source.parameters(), lr=3.5e-4)
    checkpoint = {"model": source.state_dict(), "center_loss": center_loss.state_dict(),
                  "optimizer": optimizer.state_dict(), "epoch": 3, "best_metric": 0.5,
                  "config": {"MODEL.NAME": "resnet18", "SOLVER.MARGIN": 0.5}, "model_name": "resnet18",
                  "num_classes": 7, "last_stride": 2, "stem_relu": False, "rng": {"torch": torch.get_rng_state()}}
    path = tmp_path / "last.pth"
    torch.save(checkpoint, path)
    return path, source.eval(), center_loss


def test_our_checkpoints_without_a_stem_record_had_the_relu(tmp_path):
    path, _, _ = our_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["stem_relu"]  # written before the stem was recorded: always with the ReLU
    torch.save(checkpoint, path)
    assert model_from_checkpoint(path).stem_relu
    model = build_model("resnet18", num_classes=7, last_stride=2)
    assert "stem with ReLU" in load_weights(model, path) and model.stem_relu


def test_masked_bnneck_is_batch_norm_over_the_real_rows():
    torch.manual_seed(0)
    feats, is_real = torch.randn(12, 6) * 3 + 1, torch.tensor([True] * 5 + [False] * 2 + [True] * 5)
    masked, reference = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        masked.weight.uniform_(0.5, 2), masked.bias.uniform_(-1, 1)
    reference.load_state_dict(masked.state_dict())
    for _ in range(2):  # running statistics follow the real rows too
        out = masked_batch_norm(masked, feats, is_real)
        assert torch.allclose(out[is_real], reference(feats[is_real]), atol=1e-5)
    for name, buffer in reference.state_dict().items():
        assert torch.allclose(masked.state_dict()[name], buffer, atol=1e-6), name
    # in the model: other mock images leave the real rows' logits as they were (the backbone in eval mode
    # here, since its BatchNorm sees the mocks, as the original's does)
    model = build_model("resnet18", num_classes=3).train()
    model.backbone.eval()
    x, is_real = images(batch=4), torch.tensor([True, True, False, False])
    _, logits = model(x, is_real)
    x[2:] = 0
    assert torch.allclose(model(x, is_real)[1][:2], logits[:2], atol=1e-5) and logits.shape == (4, 3)


def test_model_from_our_checkpoint_rebuilds_the_same_network(tmp_path):
    path, source, _ = our_checkpoint(tmp_path)
    model = model_from_checkpoint(path)
    assert (model.name, model.num_classes, model.last_stride, model.stem_relu) == ("resnet18", 7, 2, False)
    with torch.no_grad():
        assert torch.allclose(model(images()), source(images()), atol=1e-6)


def test_fine_tuning_on_other_identities_skips_classifier_and_centers(tmp_path):
    path, source, _ = our_checkpoint(tmp_path)
    model = build_model("resnet18", num_classes=9, last_stride=2)
    center_loss = CenterLoss(9, 512)
    summary = load_weights(model, path, center_loss)
    assert "skipped classifier.weight: 7 identities in the file, 9 in the model" in summary
    assert "skipped centers: 7 identities" in summary
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)


def test_pretrained_without_file_says_where_to_put_which_file(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "MODELS_DIR", tmp_path)
    with pytest.raises(WeightError) as error:
        build_model("resnet50", pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "resnet50-19c8e357.pth") in message
    assert "https://download.pytorch.org/models/resnet50-19c8e357.pth" in message
    assert "nothing is downloaded" in message and "--MODEL.PRETRAINED false" in message


def test_pretrained_uses_the_default_file_when_present(tmp_path, monkeypatch):
    path, net = torchvision_file(tmp_path)
    path.rename(tmp_path / "resnet18-5c106cde.pth")
    monkeypatch.setattr(model_module, "MODELS_DIR", tmp_path)
    model = build_model("resnet18", num_classes=2, pretrained=True)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, net.layer1[0].conv1.weight)


def test_refuses_missing_and_garbage_files(tmp_path):
    model = build_model("resnet18", num_classes=2)
    with pytest.raises(WeightError, match="no such weight file"):
        load_weights(model, tmp_path / "absent.pth")
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not weights")
    with pytest.raises(WeightError, match="not a PyTorch weight file"):
        load_weights(model, garbage)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WeightError, match="expected a dict of tensors, found list"):
        load_weights(model, listing)


class Payload:
    """Unpickling this would create a directory: weights_only loading must refuse it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "created-by-unpickling"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(str(marker))}, path)
    with pytest.raises(WeightError, match="weights_only"):
        load_weights(build_model("resnet18", num_classes=2), path)
    assert not marker.exists()
    whole_module = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), whole_module)
    with pytest.raises(WeightError, match="state_dict"):
        model_from_checkpoint(whole_module)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightError) as error:
        load_weights(build_model("resnet18", num_classes=2), path)
    assert "backbone.conv1.weight" in str(error.value)
    assert "(32, 3, 7, 7)" in str(error.value) and "(64, 3, 7, 7)" in str(error.value)


def test_wrong_architecture_file_is_refused_with_a_hint(tmp_path):
    path, _ = torchvision_file(tmp_path, "resnet18")
    with pytest.raises(WeightError, match="looks like resnet18, the model is resnet34"):
        build_model("resnet34", num_classes=2, pretrain_path=str(path))
