"""A stand-in for Ascend's torch_npu on a machine without an NPU, for tests only (they put test/doubles on
sys.path or PYTHONPATH; nothing else imports it).

Like torch_npu it renames torch's third-party device to "npu", registers the torch.npu module and an "hccl"
process-group backend. What it cannot do is hold a tensor on an "npu" device (no kernels), so it says where
its tensors go instead: torch.npu.tensor_device() names the CPU, and utils.tensor_device (the project's one
device seam) places them there. Everything else is the NPU path as centroid-reid runs it on Ascend: the device
choice, set_device, synchronize, autocast with device_type "npu" (which leaves CPU tensors in fp32), the NPU
GradScaler (torch's GradScaler working on the CPU tensors), and hccl, which is gloo underneath.

Every call is recorded (calls.record, $DOUBLES_LOG). Environment: NPU_DOUBLE_DEVICES, the number of visible NPUs
(default 8; 0: torch.npu.is_available() is False); NPU_DOUBLE_BF16=1 reports bf16 support (default: not, so
mixed precision takes fp16 with the GradScaler, as on an NPU without bf16).
"""
import os
import sys
import types

import torch
import torch.distributed as dist
from calls import record

__version__ = "0.0+double"
record("import torch_npu")

if torch._C._get_privateuse1_backend_name() != "npu":
    torch.utils.rename_privateuse1_backend("npu")

npu = types.ModuleType("torch.npu", "torch.npu of the torch_npu test double")
_state = {"device": 0}


def _count():
    return int(os.environ.get("NPU_DOUBLE_DEVICES", "8"))


def _index(device):
    """The index of a device given as a torch.device, 'npu:1', an int or None (the current one)."""
    if device is None:
        return _state["device"]
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return _state["device"] if device.index is None else device.index


def is_available():
    """Whether an NPU is visible (NPU_DOUBLE_DEVICES > 0)."""
    record("is_available", result=_count() > 0)
    return _count() > 0


def device_count():
    """The number of visible NPUs."""
    return _count()


def set_device(device):
    """Make `device` this process's current NPU."""
    index = _index(device)
    if not 0 <= index < _count():
        raise RuntimeError(f"npu:{index}: invalid device ordinal ({_count()} NPUs visible)")
    _state["device"] = index
    record("set_device", device=f"npu:{index}")


def current_device():
    """The index of this process's current NPU."""
    return _state["device"]


def synchronize(device=None):
    """Wait for the NPU's queued work: the CPU work is done when called."""
    record("synchronize", device=str(device))


def is_bf16_supported():
    """NPU_DOUBLE_BF16=1: the NPU computes bf16."""
    record("is_bf16_supported")
    return os.environ.get("NPU_DOUBLE_BF16", "0") == "1"


def get_amp_supported_dtype():
    """What torch.autocast(device_type="npu") asks when it is entered."""
    record("autocast")
    return [torch.float16, torch.bfloat16]


def tensor_device(index=None):
    """Where this stand-in's tensors live: the CPU (it has no NPU kernels)."""
    record("tensor_device", index=index)
    return torch.device("cpu")


class GradScaler(torch.amp.GradScaler):
    """torch.npu.amp.GradScaler: torch's loss scaler, working on the CPU tensors."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True):
        record("GradScaler", enabled=enabled)
        super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)

    def update(self, new_scale=None):
        record("GradScaler.update", enabled=self.is_enabled())
        super().update(new_scale)


for _function in (is_available, device_count, set_device, current_device, synchronize, is_bf16_supported,
                  get_amp_supported_dtype, tensor_device):
    setattr(npu, _function.__name__, _function)
npu.amp = types.ModuleType("torch.npu.amp")
npu.amp.GradScaler = GradScaler
sys.modules["torch.npu.amp"] = npu.amp
torch._register_device_module("npu", npu)


def _hccl(store, rank, size, timeout):
    """An hccl process group: gloo, which carries the stand-in's CPU tensors."""
    record("hccl", rank=rank, size=size)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


if "hccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("hccl", _hccl, devices=["cpu", "npu"])
