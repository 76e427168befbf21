"""Devices, distributed helpers, mixed precision and atomic checkpoints for train.py and the tools."""
import contextlib
import os
import time

import torch
import torch.distributed as dist


def import_torch_npu():
    """Import torch_npu when it is installed (it registers the 'npu' device); None when it is not."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
        return torch_npu
    except ImportError:
        return None


def pick_device_type(requested="auto"):
    """Resolve auto|npu|cuda|cpu to an available device type, with a clear error when one is missing."""
    requested = requested.lower()
    if requested not in ("auto", "npu", "cuda", "cpu"):
        raise SystemExit(f"--MODEL.DEVICE {requested!r}: expected one of auto, npu, cuda, cpu")
    if requested in ("auto", "npu") and import_torch_npu() is not None and torch.npu.is_available():
        return "npu"
    if requested == "npu":
        raise SystemExit("--MODEL.DEVICE npu: torch_npu is not installed or no NPU is visible "
                         "(install Ascend's torch_npu and source test/env_npu.sh), or use --MODEL.DEVICE auto")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise SystemExit("--MODEL.DEVICE cuda: no CUDA device is visible to this torch build; "
                         "use --MODEL.DEVICE auto or cpu")
    return "cpu"


BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def init_distributed(device_type, gpu_ids=(), local_rank_arg=None):
    """Set up the device of this process and, under a launcher, the process group.

    Returns (device, rank, world_size, local_rank). Launchers (torchrun, torch.distributed.launch)
    set RANK/WORLD_SIZE/LOCAL_RANK; the legacy launcher also passes --local_rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = torch.device("cpu")
    if device_type != "cpu":
        ids = list(gpu_ids) if gpu_ids else list(range(getattr(torch, device_type).device_count()))
        if local_rank >= len(ids):
            raise SystemExit(f"local rank {local_rank} has no device: --GPU_IDS lists {ids}")
        device = torch.device(device_type, ids[local_rank])
        getattr(torch, device_type).set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(BACKENDS[device_type], rank=rank, world_size=world_size)
    return device, rank, world_size, local_rank


def is_main_process():
    """True on rank 0 (or without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm statistics): each rank's last forward updated its own."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_rows(rows, total):
    """Concatenate each rank's contiguous shard of rows (rank order) into the first `total` rows."""
    if not dist.is_initialized():
        return rows
    world = dist.get_world_size()
    shard = -(-total // world)  # every rank pads its shard to the same length for all_gather
    padded = rows.new_zeros((shard,) + tuple(rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:total]


def shard_bounds(total, rank, world_size):
    """[start, end) of this rank's contiguous shard of `total` items (the layout gather_rows expects)."""
    shard = -(-total // world_size)
    return min(rank * shard, total), min((rank + 1) * shard, total)


AMP_DTYPES = ("auto", "bf16", "fp16")


def bf16_supported(device_type):
    """Whether the device type computes bf16 natively: CUDA from compute capability 8 (Ampere), an NPU that
    reports it (torch_npu's is_bf16_supported), the CPU."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "npu":
        is_supported = getattr(getattr(torch, "npu", None), "is_bf16_supported", None)
        return bool(is_supported is not None and is_supported())
    return device_type == "cpu"


def amp_settings(device_type, enabled, dtype_name="auto"):
    """(autocast dtype or None, whether a GradScaler is needed) for a device type and --SOLVER.AMP_DTYPE.

    auto: bf16 where the device computes it natively (no loss scaling, the range of fp32), else fp16 with a
    GradScaler (older GPUs, NPUs that do not report bf16). bf16 and fp16 are taken as given."""
    if dtype_name not in AMP_DTYPES:
        raise ValueError(f"--SOLVER.AMP_DTYPE {dtype_name!r}: expected one of {', '.join(AMP_DTYPES)}")
    if not enabled:
        return None, False
    if dtype_name == "auto":
        dtype_name = "bf16" if bf16_supported(device_type) else "fp16"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return dtype, dtype == torch.float16


def memory_format(device):
    """Channels-last on accelerators (faster convolutions there); the tensors' own layout on the CPU."""
    return torch.channels_last if device.type != "cpu" else torch.preserve_format


def autocast(device, dtype):
    """torch.autocast on any device type (npu included), or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device, needed):
    """Native loss scaler for fp16: torch.amp.GradScaler, or torch_npu's on an NPU."""
    if device.type == "npu":
        import torch_npu  # noqa: F401
        return torch.npu.amp.GradScaler(enabled=needed)
    return torch.amp.GradScaler(device.type, enabled=needed)


def synchronize(device):
    """Wait for the device's queued work (for honest timings)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def timed(fn, device, repeats=1, warmup=0):
    """(fn()'s last result, [seconds of each of the repeats]) with the device synchronised around each call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    out, seconds = None, []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return out, seconds


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: an interrupted write never leaves a broken file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
