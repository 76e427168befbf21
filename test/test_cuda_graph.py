"""cuda_graph.GraphedStep: the captured step trains exactly like train.py's eager step (loss rows, parameters,
BatchNorm statistics, optimizer state), follows lr changes, works under DDP; it is refused cleanly off CUDA and
for fp16; utils.amp_settings picks bf16 where the device computes it natively."""
import copy
import types

import pytest
import torch

import utils
from cuda_graph import GraphedStep, graph_supported
from loss import CenterLoss, build_center_optimizer, compute_losses, scale_center_grads
from model import build_model

P, K, NUM_CLASSES, SIZE, LR, CENTER_WEIGHT = 4, 4, 8, (64, 32), 1e-3, 5e-4
LOSS_KWARGS = {"margin": 0.5, "distance": "euclidean", "label_smooth": 0.1, "ctl_weight": 1.0,
               "triplet_weight": 1.0, "xent_weight": 1.0, "center_weight": CENTER_WEIGHT, "check_layout": False}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def training_setup(device, optimizer_name="adam", seed=0):
    """A resnet18 CTL model, its center loss and train.py's two optimizers, identical for equal seeds."""
    torch.manual_seed(seed)
    model = build_model("resnet18", NUM_CLASSES).to(device, memory_format=utils.memory_format(device)).train()
    center_loss = CenterLoss(NUM_CLASSES, model.feat_dim).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(params, lr=LR, weight_decay=5e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
    return model, center_loss, [optimizer, build_center_optimizer(center_loss, lr=0.5)]


def eager_step(model, center_loss, optimizers, images, pids, amp_dtype):
    """train.py's step without a GradScaler (bf16 or fp32): the reference the graph must reproduce."""
    with utils.autocast(images.device, amp_dtype):
        feat, logits = model(images)
    total, terms = compute_losses(feat.float(), logits.float(), pids, center_loss, K, **LOSS_KWARGS)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    scale_center_grads(center_loss, CENTER_WEIGHT)
    for opt in optimizers:
        opt.step()
    return torch.stack([total.detach()] + [t.float() for t in terms.values()])


def batches(num, device, seed=1):
    """Random P x K batches with identity-major pids, as the PK sampler yields them."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(num):
        pids = torch.randperm(NUM_CLASSES, generator=g)[:P].repeat_interleave(K)
        images = torch.randn(P * K, 3, *SIZE, generator=g).to(device, memory_format=torch.channels_last)
        yield images, pids.to(device)


def flat_state(model, center_loss, model_params_only=False):
    """Every parameter, center and BatchNorm statistic (or the model's parameters) as one float64 vector."""
    tensors = list(model.parameters())
    if not model_params_only:
        tensors += list(center_loss.parameters()) + [b for name, b in model.named_buffers() if "running" in name]
    return torch.cat([t.detach().double().flatten() for t in tensors])


def relative_error(graph_change, eager_change):
    """|graph - eager| / |eager| of two displacements."""
    return ((graph_change - eager_change).norm() / eager_change.norm()).item()


def copy_training_state(source, target):
    """Give the target (model, center loss, optimizers) the source's weights, statistics and optimizer state."""
    for src, dst in zip([*source[:2], *source[2]], [*target[:2], *target[2]]):
        dst.load_state_dict(copy.deepcopy(src.state_dict()))  # an optimizer would share the state tensors


def run_both(optimizer_name, amp_dtype, wrap=lambda module: module, steps=8, lr_change_at=6, device="cuda",
             wrap_model=lambda model: model):
    """Train an eager and a graphed copy on the same batches, the model's lr 100x lower from lr_change_at.

    Each step starts both copies from the same state (the eager copy takes the graphed one's after each step):
    batch-hard mining and Adam turn rounding differences into different training within a few steps, so
    trajectories are compared one step at a time. Returns per step (eager loss row, graphed loss row, relative
    errors of the graphed update of everything and of the model's parameters, the graphs then held), and the
    graphed copy."""
    device = torch.device(device)
    eager, graph = training_setup(device, optimizer_name), training_setup(device, optimizer_name)
    assert torch.equal(flat_state(*eager[:2]), flat_state(*graph[:2]))
    graphed = GraphedStep(wrap(wrap_model(graph[0])), wrap(graph[1]), graph[2], LOSS_KWARGS, K, CENTER_WEIGHT,
                          amp_dtype, (P * K, 3, *SIZE), device)
    results = []
    for step, (images, pids) in enumerate(batches(steps, device)):
        if step == lr_change_at:  # what the scheduler does at an epoch's end
            for opt in (eager[2][0], graph[2][0]):
                opt.param_groups[0]["lr"] = LR / 100
        before = [flat_state(*graph[:2], only) for only in (False, True)]
        eager_row, graph_row = eager_step(*eager, images, pids, amp_dtype), graphed.step(images, pids)
        errors = [relative_error(flat_state(*graph[:2], only) - start, flat_state(*eager[:2], only) - start)
                  for only, start in zip((False, True), before)]
        results.append((eager_row, graph_row, errors, list(graphed.graphs)))
        copy_training_state(graph, eager)
    return results, graph


@pytest.fixture
def deterministic_cudnn():
    """The same convolution algorithms for both copies: the comparison measures the graph, not cuDNN."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def check_same_steps(results, row_tolerance, update_tolerance):
    """Every step: the same loss row, the same update of parameters, centers and BatchNorm statistics, and of
    the model's parameters alone. Identical kernels give identical steps; the tolerances leave room for rounding
    (capturable Adam computes its bias correction on the device), while a graph that kept the old lr after the
    100x drop (error ~100), skipped an update (1) or left the centers' gradients unscaled (~2000) is far off."""
    for step, (eager_row, graph_row, errors, _) in enumerate(results):
        assert graph_row.shape == (5,) and graph_row.dtype == torch.float32
        torch.testing.assert_close(graph_row, eager_row, rtol=row_tolerance, atol=row_tolerance, msg=f"step {step}")
        assert max(errors) < update_tolerance, f"step {step}: the graphed update is {errors} (relative) off"


@cuda
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_adam_step_trains_like_the_eager_step_and_follows_the_lr(amp_dtype, deterministic_cudnn):
    results, (model, _, optimizers) = run_both("adam", amp_dtype)
    check_same_steps(results, *((1e-4, 3e-2) if amp_dtype is None else (2e-2, 0.2)))
    graphs = [r[3] for r in results]
    assert graphs[2] == [] and len(graphs[3]) == 1  # 3 eager warm-up steps, then captured
    assert graphs[-1] == graphs[3]  # the lr lives in a device tensor: no new capture
    steps = {int(optimizers[0].state[p]["step"]) for p in model.parameters() if p.requires_grad}
    assert steps == {len(results)}  # every replay counted its Adam step
    assert isinstance(optimizers[0].param_groups[0]["lr"], float)  # the scheduler and checkpoints see a float
    assert not optimizers[0].param_groups[0]["capturable"]


@cuda
def test_graphed_sgd_step_is_captured_again_when_its_lr_changes(deterministic_cudnn):
    results, _ = run_both("sgd", None)
    check_same_steps(results, 1e-4, 3e-2)
    graphs = [r[3] for r in results]
    assert graphs[5] == graphs[3] and graphs[6] != graphs[5]


@cuda
def test_graphed_step_under_ddp_averages_grads_between_two_graphs(deterministic_cudnn, tmp_path):
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, device_ids=[torch.cuda.current_device()])  # noqa: E731
        results, _ = run_both("adam", None, wrap=wrap)
    finally:
        torch.distributed.destroy_process_group()
    check_same_steps(results, 1e-4, 3e-2)
    assert len(results[-1][3]) == 2  # forward/backward, all-reduce outside, then the optimizer steps


@cuda
def test_a_batch_of_another_shape_is_refused():
    model, center_loss, optimizers = training_setup(torch.device("cuda"))
    graphed = GraphedStep(model, center_loss, optimizers, LOSS_KWARGS, K, CENTER_WEIGHT, torch.bfloat16,
                          (P * K, 3, *SIZE), "cuda")
    images, pids = next(batches(1, "cuda"))
    with pytest.raises(ValueError, match="one size"):
        graphed.step(images[:8], pids[:8])


def test_graph_is_refused_with_a_reason_off_cuda_and_for_fp16():
    for device, dtype, backend, kwargs in [("cpu", None, "native", {}), ("npu", torch.bfloat16, "native", {}),
                                           ("cuda", torch.float16, "native", {}), ("cuda", None, "apex", {}),
                                           ("cuda", torch.bfloat16, "native", {"compiled": True}),
                                           ("cuda", torch.bfloat16, "native", {"sync_bn": True})]:
        supported, reason = graph_supported(device, dtype, backend, **kwargs)
        assert not supported and ("runs eagerly" in reason or "without a CUDA graph" in reason), reason
    assert graph_supported("cuda", torch.bfloat16, "native") == (True, "")
    assert graph_supported(torch.device("cuda", 0), None) == (True, "")  # fp32


def test_graphed_step_on_the_cpu_raises_the_reason():
    model, center_loss, optimizers = training_setup(torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedStep(model, center_loss, optimizers, LOSS_KWARGS, K, CENTER_WEIGHT, None, (P * K, 3, *SIZE), "cpu")


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


class HostRead(torch.nn.Module):
    """The model behind a forward that reads a device value on the host, as a data-dependent branch does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        if images.abs().sum().item() < 0:  # never true; the read itself cannot be captured
            raise AssertionError
        return self.model(images)


@cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_why(deterministic_cudnn):
    # last in the file: it leaves a failed capture behind
    with pytest.warns(UserWarning, match="CUDA graph capture failed, the step runs eagerly"):
        results, _ = run_both("adam", None, wrap_model=HostRead)
    check_same_steps(results, 1e-4, 3e-2)
    assert all(r[3] == [] for r in results)  # never captured, every step trained
