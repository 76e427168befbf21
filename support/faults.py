"""What a long training run survives, in one place, called by train.py at named points: stop signals (finish the
step, save, exit), the ranks' agreement before each step, files that cannot be read (found before the run, met
mid-epoch on any rank, met in an evaluation: image_check.UnreadableImages decides per file, this module makes the
ranks agree), the output folder tried before training, a save that fails, a rank
that dies, and the one line each of these ends the run with."""
import errno
import os
import signal
import sys
import time

import torch

from support import utils
from support.device_data import DeviceAugmentLoader
from support.image_check import (
    SKIPPED,
    GuardedImages,
    UnreadableImages,
    bad_images_report,
    dataset_paths,
    preflight_check,
    with_dataset,
    without_paths,
)
from support.utils import DataError

STOP_SIGNAL = {"signum": None, "time": 0.0}  # the first SIGINT/SIGTERM this process received, and when
SIGNAL_REPEAT_S = 1.0  # a second signal sooner than this is the first one delivered twice, not a second request


class RunStop(Exception):
    """End the run with an exit code after a message (printed by rank 0)."""

    def __init__(self, code, message=""):
        super().__init__(message)
        self.code, self.message = code, message


class BadImageStop(Exception):
    """A file could not be read mid-run: the message names it; step (training) is the step it would have been in."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.message, self.step = message, step


class NonFiniteLoss(Exception):
    """The loss became NaN or inf."""


# ---------------------------------------------------------------------------------------------------
# Stop signals and the ranks' agreement

def request_stop(signum, frame):
    """First SIGINT/SIGTERM: finish the step and save; a second one exits at once. Ctrl-C under torchrun reaches
    each rank twice within milliseconds (from the terminal, then forwarded by the launcher): that counts once."""
    now = time.monotonic()
    if STOP_SIGNAL["signum"] is not None:
        if now - STOP_SIGNAL["time"] < SIGNAL_REPEAT_S:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    STOP_SIGNAL.update(signum=signum, time=now)
    print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pth "
          "(send it again to quit at once)", file=sys.stderr, flush=True)


def catch_stop_signals():
    """SIGINT and SIGTERM ask the run to stop at the next step (request_stop)."""
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def stop_before_step(bad_message, world_size):
    """(a stop signal on any rank, the first rank's message about a batch it could not read, or ''): every rank asks
    before each step, so all of them stop at the same step, before any trains on a batch one could not read. One
    all-reduce of two host flags (no device sync); the messages travel only when one is set."""
    stop, bad = utils.any_rank(STOP_SIGNAL["signum"] is not None, bad_message)
    if bad and world_size > 1:
        bad_message = next(message for message in utils.all_gather_objects(bad_message) if message)
    return stop, bad_message if bad else ""


def first_non_finite_step(first_bad):
    """The first step whose loss was NaN/inf on any rank, or -1 (first_bad: this rank's, a device tensor): one small
    collective and one host read, the only host sync of a step (at log steps)."""
    return int(utils.all_reduce_max(first_bad.clone()).item())


def non_finite_message(epoch, step, amp_dtype):
    """What to say when the loss is NaN/inf: lower the lr, and another precision only if one would help."""
    advice = "lower --SOLVER.BASE_LR"
    if amp_dtype == torch.float16:
        advice += ", or try --SOLVER.AMP_DTYPE bf16 (fp16 overflows past 65504)"
    elif amp_dtype == torch.bfloat16:
        advice += ", or run fp32 with --USE_MIXED_PRECISION false"
    return f"non-finite loss at epoch {epoch + 1}, step {step + 1}: stopping; last.pth still holds the last " \
           f"good state ({advice})"


# ---------------------------------------------------------------------------------------------------
# Files that cannot be read

class GuardedLoader:
    """The training loader; a batch it cannot read (a file gone bad, a JPEG the device decoder rejects) ends the
    iteration, with bad_message saying which file: train_one_epoch then stops every rank before that step."""

    def __init__(self, loader):
        self.loader, self.batch_sampler, self.bad_message = loader, loader.batch_sampler, ""

    def __iter__(self):
        self.bad_message = ""
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as err:
                self.bad_message = str(err)
                yield None  # the step this batch was for: every rank agrees there to stop
                return
            yield batch


def guard_train_loader(loader, cfg):
    """The training loader, reading its files under the config's UnreadableImages policy (GuardedImages): with
    DATALOADER.SKIP_BAD an unreadable image is replaced by another of its identity (with its augmentation seed) and
    logged in skipped.txt; without it, every rank stops before the step that needed the file (GuardedLoader), and
    the run saves last.pth there."""
    inner = loader.loader if isinstance(loader, DeviceAugmentLoader) else loader  # its DataLoader of files
    if hasattr(getattr(inner, "dataset", None), "items"):
        guarded = with_dataset(inner, GuardedImages(inner.dataset, UnreadableImages.from_config(cfg)))
        if isinstance(loader, DeviceAugmentLoader):
            loader.loader = guarded
        else:
            loader = guarded
    return GuardedLoader(loader)


def check_images_before_training(cfg, data, rank):
    """The pre-flight image check on rank 0 (DATALOADER.CHECK_IMAGES): the data set without bad files when
    DATALOADER.SKIP_BAD, or RunStop(2) listing them. Every rank gets rank 0's verdict."""
    bad = []
    if rank == 0 and cfg.DATALOADER.CHECK_IMAGES:
        bad = preflight_check(data, cfg.DATALOADER.NUM_WORKERS, jpeg_only=cfg.INPUT.DEVICE_AUGMENT)
    bad = utils.from_rank0(bad)
    if not bad:
        return data, []
    report = bad_images_report(bad, len(dataset_paths(data)), cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR)
    if not UnreadableImages.from_config(cfg).skip:
        raise RunStop(2, f"error: {report}\nreplace or remove them, or set --DATALOADER.SKIP_BAD true to train "
                         "without them (--DATALOADER.CHECK_IMAGES false skips this check)")
    if rank == 0:
        print(f"warning: {report}\nDATALOADER.SKIP_BAD: training and evaluating without them "
              f"(listed in {cfg.OUTPUT_DIR}/{SKIPPED})", file=sys.stderr, flush=True)
    return without_paths(data, [path for path, _ in bad]), bad


# ---------------------------------------------------------------------------------------------------
# The output folder and saves

def check_output_dir(cfg, nbytes, rank):
    """On rank 0: OUTPUT_DIR takes a file of nbytes (a checkpoint), or RunStop(2) saying why not (every rank)."""
    message = None
    if rank == 0:
        try:
            utils.probe_output_dir(cfg.OUTPUT_DIR, nbytes)
        except OSError as err:
            message = (f"error: --OUTPUT_DIR {cfg.OUTPUT_DIR} cannot take a checkpoint ({nbytes / 2**20:.0f} MB): "
                       f"{err.strerror or err}; free space there or choose another OUTPUT_DIR")
    message = utils.from_rank0(message)
    if message:
        raise RunStop(2, message)


def save_failure(path, err):
    """The one line for a file that could not be written: the file, why, and that the last checkpoint is intact."""
    last = os.path.join(os.path.dirname(path), "last.pth")
    if os.path.exists(last):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(last)))
        kept = f"{last} from {when} is intact"
    else:
        kept = "no last.pth was saved before"
    fix = "free space in" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix"
    return (f"error: cannot write {path} ({err.strerror or err}): {kept}; {fix} {os.path.dirname(path)}, "
            f"then continue with: {resume_command(os.path.dirname(path))}")


def stop_if_failed(failure):
    """Every rank stops (exit 2) when rank 0's write failed (failure: its line, or None); also a barrier."""
    failure = utils.from_rank0(failure)
    if failure:
        raise RunStop(2, failure)


# ---------------------------------------------------------------------------------------------------
# The lines a stopped run ends with, and its exit code

def resume_command(output_dir):
    """The command that continues this run."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={local} " if local > 1 else "python "
    return f"{launcher}train.py --config_file {output_dir}/config.yaml --resume auto"


def resume_hint(output_dir):
    """How to go on after a failure that saved nothing: from last.pth if an earlier save left one; by itself when
    torchrun has restarts left (--max-restarts)."""
    saved = os.path.exists(os.path.join(output_dir, "last.pth"))
    if utils.restart_count() < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        return (f"torchrun restarts the group, which {'resumes from last.pth' if saved else 'starts again'} by itself "
                f"(restart {utils.restart_count() + 1} of {os.environ['TORCHELASTIC_MAX_RESTARTS']})")
    if saved:
        return f"continue from {output_dir}/last.pth with: {resume_command(output_dir)}"
    return "no last.pth was saved yet: start again with the same command"


def bad_image_line(message, where, cfg):
    """The one line that ends a run stopped by a bad image (after a line break: the progress bar holds the line);
    message: the UnreadableImages policy's (it names the file and the fix), or the device decoder's."""
    return (f"\nerror: {message}; stopped at {where}, saved {cfg.OUTPUT_DIR}/last.pth: once the file is fixed, "
            f"continue with: {resume_command(cfg.OUTPUT_DIR)}")


def stopped_by_signal(where, cfg):
    """After a stop signal at a step boundary: say where; the exit code, 128 + the signal (SIGINT/SIGTERM)."""
    print(f"stopped at {where}: saved {cfg.OUTPUT_DIR}/last.pth (continue with --resume auto)", flush=True)
    return 128 + (STOP_SIGNAL["signum"] or signal.SIGTERM)  # another rank's signal: this one stops as if it got it


def exit_code(run, cfg, rank, world_size):
    """run()'s exit code, with the ends a run can meet said in one line (rank 0, or the rank that saw it): bad input
    2, a RunStop its code, a dead or stuck rank 1."""
    try:
        return run()
    except utils.UserError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RunStop as stop:
        if stop.message and rank == 0:
            print(stop.message, file=sys.stderr, flush=True)
        return stop.code
    except RuntimeError as err:  # a collective that failed because a rank died, or a real error
        message = utils.collective_failure(err) if world_size > 1 else None
        if message is None:
            raise
        print(f"\nerror: rank {rank}: {message}; stopping: {resume_hint(cfg.OUTPUT_DIR)}", file=sys.stderr, flush=True)
        return 1
