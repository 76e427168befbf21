"""Devices, distributed helpers, mixed precision, atomic checkpoints, and the errors and exit codes of every tool."""
import atexit
import contextlib
import datetime
import errno
import functools
import os
import sys
import threading
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """Input the user can fix (a file, folder, flag, checkpoint, or an optional package to install): every command
    prints its message as one `error: ...` line, without a traceback, and exits with status 2."""


def command(main):
    """Decorate a command's main(argv=None) -> exit code: a UserError becomes one `error: ...` line on stderr and
    exit code 2 (argparse's own errors exit 2 too); main returns 0 when done and 1 for a failure it reports."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    return run


class DataError(UserError):
    """Bad input data: the message names the path and what was expected."""

    def __init__(self, message):
        # A loader worker's DataError is re-raised in the main process as DataError("Caught DataError
        # in DataLoader worker ... Original Traceback ... utils.DataError: <message>"): keep the message,
        # bad data needs no traceback.
        if "Original Traceback" in message and "DataError: " in message:
            message = message.rsplit("DataError: ", 1)[1].strip()
        super().__init__(message)


def usable_workers(num_workers):
    """No more loader processes than cores: extra ones only compete with the training process."""
    return max(0, min(int(num_workers), os.cpu_count() or 1))


def split_item(item):
    """(dataset index, augmentation seed or None) of what a loader asks a dataset for: an index, or the
    (index, seed) pair of a training loader (sampler.SeededBatches)."""
    return (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), None)


def folder_listing(folder, limit=8):
    """A short "a/, b.txt, ..." listing of a folder for error messages."""
    names = sorted(os.listdir(folder))
    shown = [n + "/" if os.path.isdir(os.path.join(folder, n)) else n for n in names[:limit]]
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return (", ".join(shown) + more) if names else "nothing (empty folder)"


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
        raise UserError(f"--MODEL.DEVICE {requested!r}: expected one of auto, npu, cuda, cpu")
    if requested in ("auto", "npu") and import_torch_npu() is not None and torch.npu.is_available():
        return "npu"
    if requested == "npu":
        raise UserError("--MODEL.DEVICE npu: torch_npu is not installed or no NPU is visible "
                        "(install Ascend's torch_npu and source test/env_npu.sh), or use --MODEL.DEVICE auto")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise UserError("--MODEL.DEVICE cuda: no CUDA device is visible to this torch build; "
                        "use --MODEL.DEVICE auto or cpu")
    return "cpu"


# ---------------------------------------------------------------------------------------------------
# The device seam. A run talks to its device through torch.<type> (torch.npu, torch.cuda): set_device,
# synchronize, the GradScaler, the autocast device type, the process-group backend (BACKENDS). Its tensors live
# on that device, except under a stand-in that has the API but no kernels: test/doubles/torch_npu runs every NPU
# branch on a machine without an NPU and keeps its tensors on the CPU, which it names with
# torch.npu.tensor_device(). These two functions are the only code that knows about it: tensor_device where a
# device type becomes the torch.device that tensors go to (init_distributed, pick_device), device_api wherever
# the API is called for such a torch.device. With torch_npu, CUDA or the CPU both change nothing.

_STAND_IN_APIS = {}  # tensor device type -> the device type whose stand-in keeps its tensors there


def tensor_device(device):
    """Where the tensors of a device go: the torch.device itself, or the device that a stand-in backend without
    kernels names with torch.<type>.tensor_device(index) (test/doubles/torch_npu: the CPU)."""
    place = getattr(getattr(torch, device.type, None), "tensor_device", None)
    if place is None:
        return device
    placed = torch.device(place(device.index))
    _STAND_IN_APIS[placed.type] = device.type
    return placed


def device_api(device):
    """The device type whose torch.<type> API serves a device (a torch.device or a type name): its own type, or
    that of the stand-in whose tensors tensor_device put there."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return _STAND_IN_APIS.get(device_type, device_type)


def pick_device(requested="auto"):
    """The torch.device that tensors go to for --MODEL.DEVICE (or a tool's --device) auto|npu|cuda|cpu."""
    return tensor_device(torch.device(pick_device_type(requested)))


BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


COLLECTIVE_TIMEOUT_S = 600  # a collective waiting this long fails (a rank that hangs without dying)
PEER_TIMEOUT_ENV = "CENTROID_REID_PEER_TIMEOUT_S"  # a rank silent this long counts as dead (default 30 s)


def init_distributed(device_type, gpu_ids=(), local_rank_arg=None):
    """Set up the device of this process and, under a launcher, the process group and the rank heartbeat.

    Returns (device, rank, world_size, local_rank). Launchers (torchrun, torch.distributed.launch)
    set RANK/WORLD_SIZE/LOCAL_RANK; the legacy launcher also passes --local_rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    device = torch.device("cpu")
    if device_type != "cpu":
        api = getattr(torch, device_type)
        ids = list(gpu_ids) if gpu_ids else list(range(api.device_count()))
        if local_rank >= len(ids):
            raise UserError(f"local rank {local_rank} has no device: --GPU_IDS lists {ids}")
        api.set_device(torch.device(device_type, ids[local_rank]))
        device = tensor_device(torch.device(device_type, ids[local_rank]))
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # a group that torchrun restarts (--max-restarts) meets again in the launcher's store: under keys of its own,
        # or its ranks may read the previous round's addresses and fail to connect (gloo) or wait (NCCL)
        store = dist.PrefixStore(f"centroid_reid/round{restart_count()}", store)
        dist.init_process_group(BACKENDS[device_type], store=store, rank=rank, world_size=world_size, timeout=timeout)
        # decisions on the host (stop, a bad file) travel through gloo: no device sync, no device tensor
        HOST_GROUP["group"] = None if device_type == "cpu" else dist.new_group(backend="gloo", timeout=timeout)
        start_heartbeat(rank, world_size)
    return device, rank, world_size, local_rank


HOST_GROUP = {"group": None}  # a gloo group beside an NCCL/HCCL one; None: the default group is gloo already


def any_rank(*flags):
    """[whether any rank's flag i is set] for host booleans: one small all-reduce through gloo, no device sync
    (the flags themselves without a process group)."""
    if not dist.is_initialized():
        return [bool(flag) for flag in flags]
    values = torch.tensor([float(bool(flag)) for flag in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=HOST_GROUP["group"])
    return [bool(value) for value in values.tolist()]


# ---------------------------------------------------------------------------------------------------
# Which rank died: every rank bumps a counter in the launcher's key-value store each second; one whose
# counter stops has died (SIGKILL, out of memory, a node gone) or exited.

HEARTBEAT = {"store": None, "rank": 0, "world_size": 1, "stop": threading.Event(), "reporting": False,
             "thread": None}


def _beat_key(rank):
    return f"centroid_reid/{restart_count()}/heartbeat/{rank}"


def _done_key(rank):
    return f"centroid_reid/{restart_count()}/exited/{rank}"


def restart_count():
    """How often torchrun (--max-restarts) has restarted this job's workers: the keys of an earlier round, in the
    launcher's store that outlives it, are not this round's."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def start_heartbeat(rank, world_size, period_s=1.0):
    """Bump this rank's counter every period_s and watch the others' (a daemon thread); no-op without the
    MASTER_ADDR/MASTER_PORT store a launcher sets."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=30))
    store.add(_beat_key(rank), 1)
    HEARTBEAT.update(store=store, rank=rank, world_size=world_size)
    HEARTBEAT["stop"].clear()
    atexit.register(_mark_exited)
    HEARTBEAT["thread"] = threading.Thread(target=_heartbeat_loop, args=(period_s,), daemon=True, name="heartbeat")
    HEARTBEAT["thread"].start()


def _mark_exited():
    """At an orderly exit: stop beating and tell the others this rank left on purpose."""
    HEARTBEAT["stop"].set()
    with contextlib.suppress(Exception):
        HEARTBEAT["store"].set(_done_key(HEARTBEAT["rank"]), "1")
    # joined here, not left to the interpreter's shutdown: a daemon thread that comes back from a store call into a
    # finalising interpreter is ended by pthread_exit through C++ frames, and the process aborts ("terminate called
    # without an active exception", exit -6) after a run that succeeded
    HEARTBEAT["thread"].join(timeout=5)


def _counters(store, world_size):
    """[heartbeat count of each rank], -1 for a rank that has exited (add 0 reads without waiting for the key)."""
    return [-1 if store.check([_done_key(r)]) else store.add(_beat_key(r), 0) for r in range(world_size)]


def _heartbeat_loop(period_s, checks_every=5):
    """Beat; every few beats, look for a rank silent longer than the peer timeout: say which and end this process
    (a rank blocked in an NCCL/HCCL collective would otherwise wait for the collective timeout)."""
    store, rank, world_size = HEARTBEAT["store"], HEARTBEAT["rank"], HEARTBEAT["world_size"]
    timeout = float(os.environ.get(PEER_TIMEOUT_ENV, "30"))
    seen, changed, beats = None, {}, 0
    while not HEARTBEAT["stop"].wait(period_s):
        beats += 1
        now = time.monotonic()
        try:
            store.add(_beat_key(rank), 1)
            counts = _counters(store, world_size) if beats % checks_every == 0 else seen
        except Exception:  # noqa: BLE001  (the store's host, rank 0 or the launcher, is gone)
            changed.setdefault("store", now)
            counts = seen
        else:
            changed.pop("store", None)
        if counts is None:
            continue
        changed.update({r: now for r, count in enumerate(counts) if seen is None or count != seen[r]})
        seen = counts
        silent = [r for r, t in changed.items() if now - t > timeout and r != rank and (r == "store" or seen[r] >= 0)]
        if silent and not HEARTBEAT["reporting"] and not HEARTBEAT["stop"].is_set():
            print(f"\nerror: rank {rank}: {describe_silent(silent, timeout)}; stopping this rank too",
                  file=sys.stderr, flush=True)
            os._exit(1)


def describe_silent(silent, seconds):
    """'rank 1 stopped responding ...' for a list of ranks (or 'store': the rendezvous store went away)."""
    if "store" in silent:
        return (f"the launcher's rendezvous store (hosted by rank 0 or the launcher) has not answered for "
                f"{seconds:g} s: rank 0 or the launcher died")
    ranks = ", ".join(map(str, silent))
    return (f"rank{'s' if len(silent) > 1 else ''} {ranks} stopped responding (no heartbeat for {seconds:g} s: "
            "killed, out of memory, hung, or its node went down)")


DEAD_RANK_WAIT_S = 3  # after a failed collective: a rank whose heartbeat stays still this long has died


def dead_ranks(wait_s=DEAD_RANK_WAIT_S):
    """After a failed collective: (ranks that died, ranks that exited), judged by whose heartbeat stands still over
    wait_s; "store" when the store itself is gone (rank 0 or the launcher died); None without a heartbeat."""
    store, world_size = HEARTBEAT["store"], HEARTBEAT["world_size"]
    if store is None:
        return None
    HEARTBEAT["reporting"] = True  # this thread says what happened; the watcher stays quiet
    try:
        before = _counters(store, world_size)
        time.sleep(wait_s)
        after = _counters(store, world_size)
    except Exception:  # noqa: BLE001
        return "store"
    me = HEARTBEAT["rank"]
    died = [r for r in range(world_size) if r != me and after[r] >= 0 and after[r] == before[r]]
    exited = [r for r in range(world_size) if r != me and after[r] < 0]
    return died, exited


def collective_failure(err):
    """One line on why a collective failed (which rank died or exited, or that one hangs); None when every rank is
    alive and it did not time out (then it is an error of its own)."""
    ranks, text = dead_ranks(), first_line(err)
    if ranks == "store":
        return describe_silent(["store"], DEAD_RANK_WAIT_S)
    if ranks is None:
        return f"a collective failed ({text}): another rank stopped, its output says why"
    died, exited = ranks
    if died:
        return describe_silent(died, DEAD_RANK_WAIT_S)
    if exited:
        return f"rank{'s' if len(exited) > 1 else ''} {', '.join(map(str, exited))} exited (its output says why)"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"a collective timed out ({text}): a rank is alive but stuck (in I/O, or a deadlock)"
    return None


def first_line(err, limit=160):
    """The first line of an exception's message, shortened: enough to recognise it in a one-line error."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def all_reduce_max(tensor):
    """The element-wise maximum of a tensor over all ranks, in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
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


def from_rank0(obj):
    """Rank 0's value of a picklable object, on every rank (the object itself without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=HOST_GROUP["group"])
    return box[0]


def all_gather_objects(obj):
    """[each rank's obj] in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=HOST_GROUP["group"])
    return gathered


def decided_by_rank0(decide, rank):
    """decide() run on rank 0 only, its value (or the UserError it raised) on every rank: one answer where each
    rank's own file system could give another (a node without the shared folder)."""
    outcome = None
    if rank == 0:
        try:
            outcome = (decide(), None)
        except UserError as err:
            outcome = (None, err)
    value, error = from_rank0(outcome)
    if error is not None:
        raise error
    return value


def on_every_rank(work):
    """work() on every rank; if it raised a UserError on any, the first rank's error is raised on all of them
    (rather than one rank stopping while the others wait for it in the next collective)."""
    error = None
    try:
        value = work()
    except UserError as err:
        value, error = None, err
    errors = [e for e in all_gather_objects(error) if e is not None]
    if errors:
        raise errors[0]
    return value


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


def amp_settings(device_type, enabled, dtype_name="auto", on_cpu=False):
    """(autocast dtype or None, whether a GradScaler is needed) for a device type and --SOLVER.AMP_DTYPE.

    The CPU runs fp32 (USE_MIXED_PRECISION is for accelerators; CPU autocast is slower there) unless on_cpu
    (a benchmark's explicit choice). auto: bf16 where the device computes it natively (no loss scaling, the
    range of fp32), else fp16 with a GradScaler (older GPUs, NPUs that do not report bf16). bf16 and fp16 are
    taken as given."""
    if dtype_name not in AMP_DTYPES:
        raise ValueError(f"--SOLVER.AMP_DTYPE {dtype_name!r}: expected one of {', '.join(AMP_DTYPES)}")
    device_type = device_api(device_type)
    if not enabled or (device_type == "cpu" and not on_cpu):
        return None, False
    if dtype_name == "auto":
        dtype_name = "bf16" if bf16_supported(device_type) else "fp16"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return dtype, dtype == torch.float16


AMP_BACKENDS = ("auto", "native", "apex")


def import_apex_amp():
    """apex.amp when apex is installed (Ascend's fork on an NPU, NVIDIA's elsewhere); None when it is not."""
    try:
        from apex import amp
    except ImportError:
        return None
    return amp


def amp_backend(requested, device, enabled=True):
    """(backend, why) for --SOLVER.AMP_BACKEND auto|native|apex on a device: auto takes apex (O2, dynamic loss
    scale: the seed's recipe) on an NPU where apex imports and native torch.autocast everywhere else; why is the
    reason, for the run to print once."""
    if requested not in AMP_BACKENDS:
        raise ValueError(f"--SOLVER.AMP_BACKEND {requested!r}: expected one of {', '.join(AMP_BACKENDS)}")
    if requested != "auto":
        return requested, f"SOLVER.AMP_BACKEND {requested}"
    if not enabled:
        return "native", "auto: USE_MIXED_PRECISION False, so no mixed precision"
    api = device_api(device)
    if api != "npu":
        return "native", f"auto: apex is for an NPU, this run is on {api}"
    if import_apex_amp() is None:
        return "native", ("auto: an NPU without apex, so native torch.autocast; Ascend's apex gives the seed's "
                          "apex O2 (requirements-npu.txt)")
    return "apex", "auto: an NPU with apex installed, the seed's apex O2 with a dynamic loss scale"


def memory_format(device):
    """Channels-last on accelerators (faster convolutions there); the tensors' own layout on the CPU."""
    return torch.channels_last if device_api(device) != "cpu" else torch.preserve_format


def autocast(device, dtype):
    """torch.autocast on any device type (npu included), or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_api(device), dtype=dtype)


def make_grad_scaler(device, needed):
    """Native loss scaler for fp16: torch.amp.GradScaler, or torch_npu's on an NPU."""
    if device_api(device) == "npu":
        import torch_npu  # noqa: F401
        return torch.npu.amp.GradScaler(enabled=needed)
    return torch.amp.GradScaler(device.type, enabled=needed)


def synchronize(device):
    """Wait for the device's queued work (for honest timings)."""
    api = device_api(device)
    if api != "cpu":
        getattr(torch, api).synchronize(device)


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


class _Recorder:
    """A file's write() that keeps the OSError it met: torch.save reports a full disk as an opaque RuntimeError."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.file.flush()


def save_atomic(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed: an interrupted or failed write (a full
    disk) never leaves a broken file and never touches the previous one; a failed write raises OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            recorder = _Recorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Replace a text file's contents in one rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def probe_output_dir(output_dir, nbytes):
    """Create output_dir and reserve a file of nbytes (one checkpoint) there, then remove it: an unwritable folder
    or a full disk shows now, not at the first save. Raises OSError."""
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, f".write_probe{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)  # reserves the blocks: a full disk fails here
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                chunk = bytes(1 << 24)  # no fallocate on this file system: write the bytes
                f.writelines(chunk[: min(len(chunk), nbytes - start)] for start in range(0, nbytes, len(chunk)))
                f.flush()
                os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
