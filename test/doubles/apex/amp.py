"""apex.amp of the apex test double: initialize and scale_loss with apex's signatures, every call recorded.

It casts nothing (the doubles compute fp32 on the CPU) and keeps one loss scale, which starts where apex's
dynamic scale starts (2**16): scale_loss yields the loss times the scale and, on leaving, divides the gradients
of the optimizers' parameters by it, as apex unscales them. It never skips a step for an overflow: an fp32 CPU
step does not overflow at this scale, and a non-finite loss stops train.py by itself."""
import contextlib

from calls import record

OPT_LEVELS = ("O0", "O1", "O2", "O3")
_state = {"scale": None}


def initialize(models, optimizers=None, enabled=True, opt_level="O1", loss_scale=None, **options):
    """(models, optimizers) as given; records opt_level, loss_scale and the names of the other options."""
    if opt_level not in OPT_LEVELS:
        raise RuntimeError(f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.")
    if loss_scale is None:  # apex's per-level default
        loss_scale = 1.0 if opt_level in ("O0", "O3") else "dynamic"
    record("amp.initialize", opt_level=opt_level, loss_scale=loss_scale, enabled=enabled, options=sorted(options),
           optimizers=len(optimizers) if isinstance(optimizers, (list, tuple)) else int(optimizers is not None))
    _state["scale"] = 2.0**16 if loss_scale == "dynamic" else float(loss_scale)
    return models if optimizers is None else (models, optimizers)


@contextlib.contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False, delay_overflow_check=False):
    """Yield the scaled loss; unscale the optimizers' gradients on leaving."""
    if _state["scale"] is None:
        raise RuntimeError("amp.scale_loss before amp.initialize: call model, optimizer = amp.initialize(...) first")
    record("amp.scale_loss", loss_id=loss_id)
    scale = _state["scale"]
    yield loss.float() * scale
    for optimizer in optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.div_(scale)
