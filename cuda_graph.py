"""The training step captured in CUDA graphs: forward, the four losses, backward, Adam and the center-loss SGD
replayed with one launch per step (two, with an all-reduce between them, under DistributedDataParallel).

At 64 images a step a ResNet50 step on a large GPU mostly waits for the host to launch its many small kernels;
a replay launches them all at once. The arithmetic is train.py's eager step (bf16 autocast or fp32; fp16 needs the
GradScaler, whose skipped steps are decided on the host, and stays eager):

    ok, reason = graph_supported(device, amp_dtype, amp_backend)
    graphed = GraphedStep(model, center_loss, optimizers, loss_kwargs, K, center_weight, amp_dtype,
                          (P * K, 3, H, W), device)
    for images, pids, _ in loader:
        loss_row = graphed.step(images, pids)  # [total, centroid_triplet, triplet, xent, center] on the device

The first WARMUP_STEPS batches train eagerly on a side stream (torch's whole-network capture recipe: lazy state,
cuDNN's algorithm choices), the next one is captured and every later one replayed. The model's optimizer takes
its lr from a device tensor (Adam/AdamW with capturable=True), so a scheduler's change needs no new capture;
optimizers without tensor-lr support (SGD, the centers' SGD) are captured again when their lr changes. If the
capture fails (an op that reads the device on the host), a warning says why and the step keeps running eagerly.
"""
import contextlib
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils
from loss import compute_losses, scale_center_grads

WARMUP_STEPS = 3  # eager steps before the capture, as in torch's whole-network example
TENSOR_LR_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)  # capturable=True takes a device lr tensor


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
        return False, "SyncBatchNorm reads a count on the host in every forward: the step runs eagerly"
    return True, ""


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def has_sync_bn(module):
    """Whether any submodule is a SyncBatchNorm."""
    return any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())


class GraphedStep:
    """train.py's training step (bf16 autocast or fp32) captured once and replayed for every P x K batch.

    model and center_loss may be DistributedDataParallel wrappers: then the gradients of both are averaged over
    the wrapper's process group by one all-reduce of a flat buffer between two graphs (NCCL is not captured, so
    no NCCL version or environment setting matters); DDP's own hooks are not used. Parameters and optimizer
    state are updated in place: build the GraphedStep after resuming a checkpoint, and a new one if the
    optimizers' state is loaded again. Do not zero the grads between steps: each replay overwrites them."""

    def __init__(self, model, center_loss, optimizers, loss_kwargs, num_instances, center_weight, amp_dtype,
                 batch_shape, device):
        self.device = torch.device(device)
        supported, reason = graph_supported(self.device, amp_dtype, sync_bn=has_sync_bn(model))
        if not supported:
            raise ValueError(f"GraphedStep: {reason}")
        self.process_group = model.process_group if isinstance(model, DistributedDataParallel) else None
        self.model, self.center_loss, self.optimizers = unwrap(model), unwrap(center_loss), list(optimizers)
        self.loss_kwargs = {**loss_kwargs, "check_layout": False}  # the layout check reads the device
        self.num_instances, self.center_weight, self.amp_dtype = num_instances, center_weight, amp_dtype
        self.warmup_left = WARMUP_STEPS
        self.images = torch.zeros(batch_shape, device=self.device).contiguous(
            memory_format=utils.memory_format(self.device))
        self.pids = torch.zeros(batch_shape[0], dtype=torch.long, device=self.device)
        self.params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        # the device lr of each group of an optimizer that takes one; the others are captured at a fixed lr
        self.tensor_lr_groups = [group for opt in self.optimizers if isinstance(opt, TENSOR_LR_OPTIMIZERS)
                                 for group in opt.param_groups]
        self.tensor_lrs = [torch.tensor(float(group["lr"]), device=self.device) for group in self.tensor_lr_groups]
        self.tensor_lr_values = [float(group["lr"]) for group in self.tensor_lr_groups]
        self.flat_grads = None
        if self.process_group is not None:
            self.flat_grads = torch.zeros(sum(p.numel() for p in self.params), device=self.device)
        self.side_stream = torch.cuda.Stream(self.device)
        self.graphs, self.loss_row, self.captured_lrs = [], None, None
        self.fallback_reason = ""  # set when a capture failed: the step then runs eagerly

    def step(self, images, pids):
        """Train on one batch (images [B, 3, H, W], identity-major pids [B]; host or device tensors) -> the
        loss row [total, centroid_triplet, triplet, xent, center] as a float32 device tensor (no host sync)."""
        if not self.model.training:
            raise ValueError("GraphedStep: the model is in eval mode; call model.train() before training steps")
        if tuple(images.shape) != tuple(self.images.shape) or tuple(pids.shape) != tuple(self.pids.shape):
            raise ValueError(f"GraphedStep: a batch of {tuple(images.shape)} images, captured for "
                             f"{tuple(self.images.shape)}: every batch must hold P x K images of one size")
        self.images.copy_(images, non_blocking=True)
        self.pids.copy_(pids, non_blocking=True)
        self._follow_lr_changes()
        if self.warmup_left > 0 or self.fallback_reason:
            self.warmup_left = max(0, self.warmup_left - 1)
            return self._eager_step()
        if not self.graphs or self._fixed_lrs() != self.captured_lrs:
            try:
                self._capture()
            except RuntimeError as err:  # an op that reads the device on the host, a kernel that cannot be captured
                self.graphs, self.loss_row = [], None
                self.fallback_reason = f"CUDA graph capture failed, the step runs eagerly: {utils.first_line(err)}"
                warnings.warn(self.fallback_reason, stacklevel=2)
                return self._eager_step()
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

    def _forward_backward(self):
        """Forward, the four losses and backward on the static batch -> the loss row."""
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):  # autocast's weight cache must not outlive a capture
            feat, logits = self.model(self.images)
        total, terms = compute_losses(feat.float(), logits.float(), self.pids, self.center_loss,
                                      self.num_instances, **self.loss_kwargs)
        total.backward()
        return torch.stack([total.detach().float()] + [t.float() for t in terms.values()])

    def _pack_grads(self):
        """Copy every gradient into the flat buffer that is all-reduced between the two graphs."""
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"GraphedStep: parameter {missing[0]} got no gradient; the distributed graphed step "
                               "averages every trainable parameter's gradient")
        torch.cat([p.grad.reshape(-1) for p in self.params], out=self.flat_grads)

    def _update(self):
        """(Averaged gradients back in place,) the centers' gradient rescaling, both optimizers' steps."""
        if self.flat_grads is not None:
            self.flat_grads.div_(dist.get_world_size(self.process_group))  # DDP averages over the ranks
            for p, part in zip(self.params, self.flat_grads.split([p.numel() for p in self.params])):
                p.grad.copy_(part.view_as(p.grad))
        scale_center_grads(self.center_loss, self.center_weight)
        for opt in self.optimizers:
            opt.step()

    def _eager_step(self):
        """A warm-up step: the captured code run eagerly, on a side stream as torch's recipe asks."""
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss_row = self._forward_backward()
            if self.flat_grads is not None:
                self._pack_grads()
                dist.all_reduce(self.flat_grads, group=self.process_group)
            self._update()
        current.wait_stream(self.side_stream)
        loss_row.record_stream(current)  # made on the side stream, read on the caller's
        return loss_row

    @contextlib.contextmanager
    def _device_lrs(self):
        """During a capture: Adam reads its lr from the device tensor (capturable=True, steps counted on the device)."""
        saved = [(group["lr"], group.get("capturable", False)) for group in self.tensor_lr_groups]
        for group, lr in zip(self.tensor_lr_groups, self.tensor_lrs):
            group["lr"], group["capturable"] = lr, True
        for opt in self.optimizers:
            for state in opt.state.values():  # warm-up (or a checkpoint) left the step counts on the host
                if isinstance(state.get("step"), torch.Tensor) and state["step"].device != self.device:
                    state["step"] = state["step"].to(self.device, torch.float32)
        try:
            yield
        finally:  # floats again: the scheduler, logging and checkpoints see the lr as before
            for group, (lr, capturable) in zip(self.tensor_lr_groups, saved):
                group["lr"], group["capturable"] = lr, capturable

    def _capture(self):
        """Record the step (two graphs and an all-reduce under DDP); grads and activations live in the graphs'
        private memory pool. Called again when a fixed lr changed: the old graphs are dropped first."""
        if self.graphs:  # a replay may still run: its memory pool must not be reused before it ends
            torch.cuda.synchronize(self.device)
        self.graphs, self.loss_row = [], None
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
        first = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate host memory while this thread captures
        with self._device_lrs(), torch.cuda.graph(first, capture_error_mode="thread_local"):
            self.loss_row = self._forward_backward()
            if self.flat_grads is None:
                self._update()
            else:
                self._pack_grads()
        self.graphs.append(first)
        if self.flat_grads is not None:
            second = torch.cuda.CUDAGraph()
            with self._device_lrs(), torch.cuda.graph(second, pool=first.pool(), capture_error_mode="thread_local"):
                self._update()
            self.graphs.append(second)
        self.captured_lrs = self._fixed_lrs()
