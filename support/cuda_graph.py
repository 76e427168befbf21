"""The training step captured in CUDA graphs: train.py's step body (forward, the four losses, backward, the
optimizers and the center-loss SGD) recorded once and replayed with one launch per step (two, with an all-reduce
between them, when the gradients are averaged over ranks).

At 64 images a step a ResNet50 step on a large GPU mostly waits for the host to launch its many small kernels;
a replay launches them all at once. The body is train.py's own (bf16 autocast or fp32; fp16 needs the
GradScaler, whose skipped steps are decided on the host, and stays eager):

    ok, reason = graph_supported(device, amp_dtype, amp_backend)
    graphed = GraphedStep(StepHalves(forward_backward, update), optimizers, (P * K, 3, H, W), device)
    for images, pids, _, is_real in loader:
        loss_row = graphed.step(images, pids)  # [total, centroid_triplet, triplet, xent, center] on the device

This class only copies each batch into static inputs, records, replays, and averages the gradients between the
two halves of the body under several ranks. The first warmup_steps batches train eagerly on a side stream
(torch's whole-network capture recipe: lazy state, cuDNN's algorithm choices), the next one is captured and every
later one replayed; a batch of another shape (DROP_LAST False's last, smaller step) trains eagerly. The model's
optimizer takes its lr from a device tensor (Adam/AdamW with capturable=True), so a scheduler's change needs no
new capture; optimizers without tensor-lr support (SGD, the centers' SGD) are captured again when their lr
changes. If the capture fails (an op that reads the device on the host), a warning says why and the step keeps
running eagerly. `record` is the one place that touches CUDA graphs: a test hands in a direct call instead.
"""
import contextlib
import typing
import warnings

import torch
import torch.distributed as dist

from support import utils

WARMUP_STEPS = 3  # eager steps before the capture, as in torch's whole-network example
TENSOR_LR_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)  # take a device lr tensor (capturable=True on CUDA)


def graph_supported(device, amp_dtype, amp_backend="native", compiled=False, sync_bn=False):
    """(whether the training step can run as a CUDA graph, why not): the reason is for printing once."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type != "cuda":
        return False, f"CUDA graphs need a CUDA device: the {device_type} step runs eagerly"
    if amp_backend != "native":
        return False, f"the {amp_backend} mixed-precision backend scales the loss on the host: the step runs eagerly"
    if amp_dtype == torch.float16:
        return False, ("fp16 needs the GradScaler, whose skipped steps are decided on the host: the step runs "
                       "eagerly (bf16 or fp32 run as a CUDA graph)")
    if compiled:
        return False, "torch.compile brings its own graphs: the compiled step runs without a CUDA graph"
    if sync_bn:
        return False, ("SOLVER.SYNC_BN all-reduces BatchNorm statistics inside the forward, which the graph does not "
                       "capture: the step runs eagerly")
    return True, ""


class StepHalves(typing.NamedTuple):
    """train.py's step body in its two halves, bound to the model and center loss the graph trains (not DDP
    wrappers): forward_backward(images, pids, is_real) -> loss row, then update()."""
    forward_backward: typing.Callable
    update: typing.Callable


def record_graph(fn, pool=None):
    """Capture fn's kernels in a CUDA graph: replay() runs them again on the same memory, pool() names it."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may allocate host memory while this thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


class GraphedStep:
    """train.py's step body (bf16 autocast or fp32) captured once and replayed for every P x K batch.

    With a process_group (several ranks), the gradients of every parameter the optimizers hold are averaged over
    it by one all-reduce of a flat buffer between the two halves (NCCL is not captured, so no NCCL version or
    environment setting matters); DDP's own hooks are not used. masked: the batches carry is_real (mock images),
    copied like the images. Parameters and optimizer state are updated in place: build the GraphedStep after
    resuming a checkpoint, and a new one if the optimizers' state is loaded again."""

    def __init__(self, halves, optimizers, batch_shape, device, masked=False, process_group=None,
                 warmup_steps=WARMUP_STEPS, record=record_graph):
        self.device, self.halves, self.record = torch.device(device), halves, record
        self.optimizers, self.process_group, self.warmup_left = list(optimizers), process_group, warmup_steps
        self.images = torch.zeros(batch_shape, device=self.device).contiguous(
            memory_format=utils.memory_format(self.device))
        self.pids = torch.zeros(batch_shape[0], dtype=torch.long, device=self.device)
        self.is_real = torch.ones(batch_shape[0], dtype=torch.bool, device=self.device) if masked else None
        self.params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        # the device lr of each group of an optimizer that takes one; the others are captured at a fixed lr
        self.tensor_lr_groups = [group for opt in self.optimizers if isinstance(opt, TENSOR_LR_OPTIMIZERS)
                                 for group in opt.param_groups]
        self.tensor_lrs = [torch.tensor(float(group["lr"]), device=self.device) for group in self.tensor_lr_groups]
        self.tensor_lr_values = [float(group["lr"]) for group in self.tensor_lr_groups]
        self.flat_grads = None
        if process_group is not None:
            self.flat_grads = torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graphs, self.loss_row, self.captured_lrs = [], None, None
        self.fallback_reason = ""  # set when a capture failed: the step then runs eagerly

    def step(self, images, pids, is_real=None):
        """Train on one batch (images [B, 3, H, W], identity-major pids [B], is_real [B] when masked; host or device
        tensors) -> the loss row [total, centroid_triplet, triplet, xent, center] as a float32 device tensor (no
        host sync). A batch of another shape than the captured one trains eagerly."""
        if tuple(images.shape) != tuple(self.images.shape):  # DROP_LAST False: the epoch's last, smaller step
            return self._eager_step(images.to(self.device), pids.to(self.device),
                                    None if self.is_real is None else is_real.to(self.device))
        self.images.copy_(images, non_blocking=True)
        self.pids.copy_(pids, non_blocking=True)
        if self.is_real is not None:
            self.is_real.copy_(is_real, non_blocking=True)
        self._follow_lr_changes()
        if self.warmup_left > 0 or self.fallback_reason:
            self.warmup_left = max(0, self.warmup_left - 1)
            return self._eager_step(self.images, self.pids, self.is_real)
        if not self.graphs or self._fixed_lrs() != self.captured_lrs:
            try:
                self._capture()
            except RuntimeError as err:  # an op that reads the device on the host, a kernel that cannot be captured
                self.graphs, self.loss_row = [], None
                self.fallback_reason = f"CUDA graph capture failed, the step runs eagerly: {utils.first_line(err)}"
                warnings.warn(self.fallback_reason, stacklevel=2)
                return self._eager_step(self.images, self.pids, self.is_real)
        self.graphs[0].replay()
        if self.flat_grads is not None:
            dist.all_reduce(self.flat_grads, group=self.process_group)
            self.graphs[1].replay()
        return self.loss_row.clone()  # the graph overwrites its output at the next replay

    @property
    def captured(self):
        """Whether the step now runs as replays of a captured graph (False during warm-up and after a failed
        capture, whose reason fallback_reason gives)."""
        return bool(self.graphs)

    def _follow_lr_changes(self):
        """Copy a float lr that a scheduler changed into its device tensor (a tiny kernel, no host sync)."""
        for i, group in enumerate(self.tensor_lr_groups):
            if float(group["lr"]) != self.tensor_lr_values[i]:
                self.tensor_lr_values[i] = float(group["lr"])
                self.tensor_lrs[i].fill_(self.tensor_lr_values[i])

    def _fixed_lrs(self):
        """The lrs baked into the graph as numbers: when one changes, the step is captured again."""
        tensor_lr_ids = {id(group) for group in self.tensor_lr_groups}
        return tuple(float(group["lr"]) for opt in self.optimizers for group in opt.param_groups
                     if id(group) not in tensor_lr_ids)

    def _first_half(self):
        """The body's first half on the static batch (and the gradients into the flat buffer under several ranks)."""
        self.loss_row = self.halves.forward_backward(self.images, self.pids, self.is_real)
        if self.flat_grads is not None:
            self._pack_grads()

    def _second_half(self):
        """(The averaged gradients back in place,) then the body's second half: the optimizers' steps."""
        if self.flat_grads is not None:
            self._unpack_grads()
        self.halves.update()

    def _pack_grads(self):
        """Copy every gradient into the flat buffer that is all-reduced between the two halves."""
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"GraphedStep: parameter {missing[0]} got no gradient; the distributed graphed step "
                               "averages every trainable parameter's gradient")
        torch.cat([p.grad.reshape(-1) for p in self.params], out=self.flat_grads)

    def _unpack_grads(self):
        """The all-reduced sums divided by the ranks (DDP averages), copied back into the gradients."""
        self.flat_grads.div_(dist.get_world_size(self.process_group))
        for p, part in zip(self.params, self.flat_grads.split([p.numel() for p in self.params])):
            p.grad.copy_(part.view_as(p.grad))

    def _eager_step(self, images, pids, is_real):
        """The body run eagerly (warm-up, a batch of another shape, a failed capture): on a side stream on CUDA, as
        torch's recipe asks before a capture."""
        current = torch.cuda.current_stream(self.device) if self.side_stream is not None else None
        if current is not None:
            self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream) if current is not None else contextlib.nullcontext():
            with self._device_lrs():
                loss_row = self.halves.forward_backward(images, pids, is_real)
                if self.flat_grads is not None:
                    self._pack_grads()
                    dist.all_reduce(self.flat_grads, group=self.process_group)
                self._second_half()
        if current is not None:
            current.wait_stream(self.side_stream)
            loss_row.record_stream(current)  # made on the side stream, read on the caller's
        return loss_row

    @contextlib.contextmanager
    def _device_lrs(self):
        """Adam reads its lr from the device tensor (with capturable=True on CUDA: its step counts stay on the device
        too), so an eager step and a replay run the same update."""
        saved = [(group["lr"], group.get("capturable", False)) for group in self.tensor_lr_groups]
        capturable = self.device.type == "cuda"  # torch's capturable optimizers run on accelerators only
        for group, lr in zip(self.tensor_lr_groups, self.tensor_lrs):
            group["lr"], group["capturable"] = lr, capturable
        for opt in self.optimizers:
            for state in opt.state.values():  # a checkpoint (or a step before) left the step counts on the host
                if isinstance(state.get("step"), torch.Tensor) and state["step"].device != self.device:
                    state["step"] = state["step"].to(self.device, torch.float32)
        try:
            yield
        finally:  # floats again: the scheduler, logging and checkpoints see the lr as before
            for group, (lr, capturable) in zip(self.tensor_lr_groups, saved):
                group["lr"], group["capturable"] = lr, capturable

    def _capture(self):
        """Record the body (its two halves apart, with the all-reduce between them, under several ranks); grads and
        activations live in the graphs' private memory pool. Called again when a fixed lr changed: the old graphs
        are dropped first."""
        if self.graphs:  # a replay may still run: its memory pool must not be reused before it ends
            utils.synchronize(self.device)
        self.graphs, self.loss_row = [], None
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
        if self.flat_grads is None:
            self.graphs = [self.record(self._with_device_lrs(self._first_half, self._second_half))]
        else:
            first = self.record(self._with_device_lrs(self._first_half))
            self.graphs = [first, self.record(self._with_device_lrs(self._second_half), pool=first.pool())]
        self.captured_lrs = self._fixed_lrs()

    def _with_device_lrs(self, *parts):
        """What a capture records: the parts run with the optimizers reading the device lr tensors."""
        def run():
            with self._device_lrs():
                for part in parts:
                    part()
        return run
