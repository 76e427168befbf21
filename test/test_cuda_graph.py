"""cuda_graph.GraphedStep replays train.py's one step body: on the CPU with its capture replaced by a direct call
(its static inputs, lr tensors and optimizer-state handling kept) it trains exactly like train.train_step; on CUDA
the captured graph does, follows lr changes and works under DDP. The graph is refused cleanly where it cannot run;
utils.amp_settings picks bf16 where the device computes it natively."""
import dataclasses
import types

import pytest
import torch
from step_setup import SIZE, DirectCall, K, P, batches, compare_steps, make_state, step_config

import train
from support import utils
from support.cuda_graph import graph_supported, record_graph

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def run_both(cfg, amp_dtype=None, device="cpu", steps=3, warmup_steps=1, record=DirectCall, lr_steps=(2,),
             last_batch=None, wrap_model=lambda model: model):
    """Train two identical states on the same batches, one with train.train_step, one through a GraphedStep; the
    schedule steps (the warm-up lr changes) before each step in lr_steps, and last_batch, when given, is one more
    batch of another shape. Each step starts both from the graphed state: Adam and batch-hard mining turn rounding
    differences (the graph's Adam reads its lr from a float32 tensor) into other training within a few steps, so
    the steps are compared one at a time. Returns (the graphed state, the GraphedStep, [(eager loss row, graphed
    loss row, relative error of the graphed update)])."""
    tiny = device == "cpu"  # on CUDA the whole resnet18: cuDNN's kernels are what a capture must survive
    eager, graph = make_state(cfg, device, amp_dtype, tiny=tiny), make_state(cfg, device, amp_dtype, tiny=tiny)
    graphed = train.graphed_step(dataclasses.replace(graph, model=wrap_model(graph.model)), (P * K, 3, *SIZE),
                                 warmup_steps=warmup_steps, record=record)
    masked = not cfg.DATALOADER.USE_RESAMPLING
    data = list(batches(steps, device, masked=masked)) + ([last_batch] if last_batch else [])
    return graph, graphed, compare_steps(eager, graph, graphed, data, lr_steps, masked)


def assert_trains_alike(steps, tolerance):
    """Every step: the same loss row and the same update of parameters, centers and BatchNorm statistics. A graph
    that kept the old lr (error ~1), skipped an update (1) or left the centers' gradients unscaled (~2000) is far
    off."""
    for step, (eager_row, graph_row, error) in enumerate(steps):
        assert graph_row.shape == (5,) and graph_row.dtype == torch.float32
        torch.testing.assert_close(graph_row, eager_row, rtol=tolerance, atol=1e-8, msg=f"step {step}")
        assert error < tolerance, f"step {step}: the graphed update is {error:.2e} (relative) off the eager one"


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_step_body_trains_like_the_eager_loop(amp_dtype):
    graph, graphed, steps = run_both(step_config("Adam"), amp_dtype)
    assert_trains_alike(steps, 1e-6)
    assert graphed.captured and [g.replays for g in graphed.graphs] == [2]  # 1 eager warm-up step, then replays
    lrs = [group["lr"] for group in graph.optimizer.param_groups]
    assert lrs[0] == pytest.approx(2e-3 / 3)
    assert graphed.tensor_lrs[0].item() == pytest.approx(lrs[0])  # the replays read the changed lr from its tensor
    assert all(isinstance(lr, float) for lr in lrs)  # the scheduler and checkpoints see floats


def test_a_graphed_sgd_step_is_recorded_again_when_its_lr_changes():
    _, graphed, steps = run_both(step_config("SGD"), steps=4, lr_steps=(3,))
    assert_trains_alike(steps, 1e-6)
    assert [g.replays for g in graphed.graphs] == [1]  # recorded again at step 3: its first replay


def test_masked_batches_and_a_last_smaller_batch_train_like_the_eager_loop():
    small = next(batches(1, masked=True, num_ids=2, seed=9))  # DROP_LAST False's last step: 2 identities
    _, graphed, steps = run_both(step_config("Adam", True), last_batch=small)
    assert graphed.is_real is not None and len(steps) == 4
    assert_trains_alike(steps, 1e-6)


def test_graph_is_refused_with_a_reason_off_cuda_and_for_fp16():
    for device, dtype, backend, kwargs in [("cpu", None, "native", {}), ("npu", torch.bfloat16, "native", {}),
                                           ("cuda", torch.float16, "native", {}), ("cuda", None, "apex", {}),
                                           ("cuda", torch.bfloat16, "native", {"compiled": True}),
                                           ("cuda", torch.bfloat16, "native", {"sync_bn": True})]:
        supported, reason = graph_supported(device, dtype, backend, **kwargs)
        assert not supported and ("runs eagerly" in reason or "without a CUDA graph" in reason), reason
    assert graph_supported("cuda", torch.bfloat16, "native") == (True, "")
    assert graph_supported(torch.device("cuda", 0), None) == (True, "")  # fp32


def test_amp_settings_auto_picks_bf16_where_the_device_has_it(monkeypatch):
    assert utils.amp_settings("cuda", False, "auto") == (None, False)
    assert utils.amp_settings("cuda", True, "fp16") == (torch.float16, True)
    assert utils.amp_settings("npu", True, "bf16") == (torch.bfloat16, False)
    assert utils.amp_settings("cpu", True, "auto") == (None, False)  # the CPU trains and evaluates in fp32
    assert utils.amp_settings("cpu", True, "auto", on_cpu=True) == (torch.bfloat16, False)  # a benchmark's choice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, expected in ((True, (torch.bfloat16, False)), (False, (torch.float16, True))):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert utils.amp_settings("cuda", True, "auto") == expected
        monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda n=native: n), raising=False)
        assert utils.amp_settings("npu", True, "auto") == expected
    monkeypatch.delattr(torch, "npu", raising=False)  # an NPU build that cannot say: fp16, as before
    assert utils.amp_settings("npu", True, "auto") == (torch.float16, True)
    with pytest.raises(ValueError, match="fp8"):
        utils.amp_settings("cuda", True, "fp8")


# ---------------------------------------------------------------------------------------------------
# On CUDA: the real capture. Kernels there are not bit-reproducible between an eager and a replayed run, so the
# tolerances leave room for rounding (capturable Adam computes its bias correction on the device), while a graph
# that kept the old lr (error ~1), skipped an update (1) or left the centers' gradients unscaled (~2000) is far off.

@pytest.fixture
def deterministic_cudnn():
    """The same convolution algorithms for both copies: the comparison measures the graph, not cuDNN."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@cuda
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_adam_step_trains_like_the_eager_step_and_follows_the_lr(amp_dtype, deterministic_cudnn):
    graph, graphed, steps = run_both(step_config("Adam"), amp_dtype, "cuda", steps=6, warmup_steps=3,
                                     record=record_graph, lr_steps=(4,))
    assert_trains_alike(steps, 3e-2 if amp_dtype is None else 0.2)
    assert len(graphed.graphs) == 1  # the lr lives in a device tensor: no new capture
    steps = {int(graph.optimizer.state[p]["step"]) for p in graph.model.parameters() if p.requires_grad}
    assert steps == {6}  # every replay counted its Adam step
    assert not graph.optimizer.param_groups[0]["capturable"]


@cuda
def test_captured_step_runs_a_smaller_last_batch_eagerly(deterministic_cudnn):
    small = next(batches(1, "cuda", num_ids=2, seed=9))
    _, graphed, steps = run_both(step_config("Adam"), None, "cuda", steps=5, warmup_steps=3, record=record_graph,
                                 last_batch=small)
    assert_trains_alike(steps, 3e-2)
    assert graphed.captured


class HostRead(torch.nn.Module):
    """The model behind a forward that reads a device value on the host, as a data-dependent branch does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, is_real=None):
        if images.abs().sum().item() < 0:  # never true; the read itself cannot be captured
            raise AssertionError
        return self.model(images, is_real)


@cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_why(deterministic_cudnn):
    # last in the file: it leaves a failed capture behind
    with pytest.warns(UserWarning, match="CUDA graph capture failed, the step runs eagerly"):
        _, graphed, steps = run_both(step_config("Adam"), None, "cuda", steps=5, warmup_steps=3,
                                     record=record_graph, wrap_model=HostRead)
    assert_trains_alike(steps, 3e-2)
    assert not graphed.captured and graphed.fallback_reason
