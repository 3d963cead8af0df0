"""The continual-learning life cycle as functions of the model, for trainers that only have hooks to call.

    from rank1_kernels.integrations import hooks
    hooks.begin_task(model, task_id)              # a fresh pool in every layer
    loss = task_loss + hooks.loss_extra(model)    # + ago_weight * AGO (zero on the first task)
    hooks.end_task(model, top_m=4)                # merge the top_m experts of every layer
    checkpoint = {"model": model.state_dict(), "pool_lifecycle": hooks.state_dict(model)}

Each model gets one PoolLifecycle (see rank1_kernels.lifecycle), created by begin_task (or lifecycle_of,
load_state_dict) with the given settings; lifecycle_of(model) returns it. A wrapper (DataParallel,
DistributedDataParallel, torch.compile) counts as the model it wraps, so a trainer may pass either. The pool
tensors and merge history travel in model.state_dict(); the lifecycle's state_dict() holds the rest of the
continual history (tasks run, counts and merged experts per task).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..lifecycle import PoolLifecycle

# The lifecycle lives on the model (it refers back to the model, a cycle the garbage collector frees with both; a
# WeakKeyDictionary from model to lifecycle would keep every model alive through that reference).
_ATTRIBUTE = "_rank1_pool_lifecycle"


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers (HF Trainer hands its hooks
    the wrapped model in one place and the bare one in another: both must reach one lifecycle)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


_DEFAULT_SETTINGS = {"top_m": 4, "ago_weight": 0.1, "ago_p": 1, "backend": "auto"}


def lifecycle_of(model: nn.Module, **settings) -> PoolLifecycle:
    """The model's PoolLifecycle, created on the first call with `settings` (top_m=4, ago_weight=0.1, ago_p=1,
    backend="auto" where not given). Settings hold for the model's whole run: a later call that passes a different
    value raises instead of ignoring it (end_task(model, top_m=...) changes one task's merge)."""
    unknown = set(settings) - set(_DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown lifecycle setting(s) {sorted(unknown)}; expected some of {list(_DEFAULT_SETTINGS)}")
    model = unwrapped(model)
    lifecycle = model.__dict__.get(_ATTRIBUTE)
    if lifecycle is None:
        lifecycle = PoolLifecycle(model, **{**_DEFAULT_SETTINGS, **settings})
        model.__dict__[_ATTRIBUTE] = lifecycle
        return lifecycle
    changed = {key: value for key, value in settings.items() if getattr(lifecycle, key) != value}
    if changed:
        current = ", ".join(f"{key}={getattr(lifecycle, key)!r}" for key in changed)
        asked = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        raise ValueError(
            f"the model's pool lifecycle has {current}, fixed at its first begin_task; got {asked}. Pass the same "
            f"settings (or none) on later tasks; end_task(model, top_m=...) changes one task's merge"
        )
    return lifecycle


def begin_task(model: nn.Module, task_id, **settings) -> None:
    """Start task `task_id`: a fresh pool in every layer. settings (top_m, ago_weight, ago_p, backend) make the
    lifecycle on the first call; later calls may repeat them, not change them."""
    lifecycle_of(model, **settings).begin_task(task_id)


def _existing(model: nn.Module, call: str) -> PoolLifecycle:
    """The lifecycle begin_task (or load_state_dict) made; never a new one with default settings."""
    lifecycle = unwrapped(model).__dict__.get(_ATTRIBUTE)
    if lifecycle is None:
        raise RuntimeError(
            f"hooks.{call}(model) before hooks.begin_task(model, task_id, ...) (or hooks.load_state_dict when "
            f"resuming): the model has no pool lifecycle yet, so its settings (top_m, ago_weight) are unknown"
        )
    return lifecycle


def loss_extra(model: nn.Module) -> torch.Tensor:
    """ago_weight * the AGO penalty: add it to the task loss before backward()."""
    return _existing(model, "loss_extra").loss_extra()


def end_task(model: nn.Module, top_m: int | None = None) -> dict[str, torch.Tensor]:
    """Merge each layer's top_m most activated experts (the lifecycle's top_m when None); returns them per layer."""
    return _existing(model, "end_task").end_task(top_m)


def state_dict(model: nn.Module) -> dict:
    """The lifecycle's history (save it beside model.state_dict())."""
    return _existing(model, "state_dict").state_dict()


def load_state_dict(model: nn.Module, state: dict) -> None:
    """Restore the lifecycle's history into the model's lifecycle (after model.load_state_dict())."""
    existing = unwrapped(model).__dict__.get(_ATTRIBUTE)
    # A lifecycle made here starts from the saved settings; an existing one takes them over from the state.
    lifecycle = existing or lifecycle_of(model, **{key: state[key] for key in ("top_m", "ago_weight", "ago_p")})
    lifecycle.load_state_dict(state)
