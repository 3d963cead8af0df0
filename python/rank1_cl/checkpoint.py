"""Per-task checkpoints, written atomically, loadable without executing code.

    <run_dir>/checkpoints/task_03_DTD/
        task_pool.safetensors   the task's trained pool before its merge: A, B, router weights, activation counts
        adapters.safetensors    every pool layer after the merge (merge history included)   [pool, lora]
        model.safetensors       the whole model after the task                               [full]
        state.pt                RNG states, the life-cycle history, the results so far, the config
                                (plain tensors and containers: torch.load(weights_only=True))
    <run_dir>/checkpoints/latest.json   {"finished_tasks": 4, "directory": "task_03_DTD"}, written last

A run killed at any point resumes from the last task whose latest.json was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch
import torch.nn as nn

from rank1_kernels import load_adapters, save_adapters
from rank1_kernels.adapters import atomic_write

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
# Settings that may change between a run and its resumption (they do not change the computation; compiled kernels
# round differently from eager ones, so a run resumed with another train.compile agrees closely, not bitwise). The
# worker count does, with data.train_augment: random transforms draw from the global generator in the main process
# and from per-worker seeds in workers.
RESUMABLE_DIFFERENCES = ("run.", "data.num_workers", "data.data_root", "model.device", "train.log_every",
                         "train.compile")  # fmt: skip


def rng_state(device: torch.device | None = None) -> dict:
    """Python, NumPy and torch (CPU, and the training device's CUDA generator) states as tensors and containers."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(float, numpy_state[2:])),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        # The training device's generator only: under DDP each rank draws from its own device, all of them seeded
        # alike and advanced alike (same shapes every step), so rank 0's is every rank's. Its view of the other
        # devices' generators is not: restoring those would reset them to the seed.
        state["cuda_current_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    if device is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if "cuda_current_device" in state:
        torch.cuda.set_rng_state(state["cuda_current_device"].cpu(), index)
    elif "cuda" in state and index < len(state["cuda"]):  # checkpoints written before: every device's state
        torch.cuda.set_rng_state(state["cuda"][index].cpu(), index)


def _to_tuples(value):
    return tuple(_to_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(saved_config: dict, config: dict) -> None:
    """Resuming with a different computation would not reproduce the uninterrupted run: refuse, naming the keys."""
    saved, current = _flatten(saved_config), _flatten(config)
    allowed = RESUMABLE_DIFFERENCES
    if saved.get("data.train_augment") or current.get("data.train_augment"):
        allowed = tuple(key for key in allowed if key != "data.num_workers")
    different = sorted(
        key for key in set(saved) | set(current)
        if saved.get(key) != current.get(key) and not key.startswith(allowed)
    )  # fmt: skip
    if different:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in different[:6])
        raise ValueError(
            f"cannot resume: the configuration differs from the checkpointed run in {details}; resume with the "
            f"same settings or start a new run directory"
        )


def save_task_pool(directory: str, model: nn.Module) -> None:
    save_adapters(model, os.path.join(directory, "task_pool.safetensors"))


def task_directory(run_dir: str, task_index: int, task_name: str) -> str:
    safe = "".join(character if character.isalnum() else "_" for character in task_name)
    return os.path.join(run_dir, CHECKPOINT_DIR, f"task_{task_index:02d}_{safe}")


def save_checkpoint(directory: str, model: nn.Module, method: str, state: dict) -> None:
    """Write the model part and state.pt into `directory`, then point latest.json at it (all atomic)."""
    if method in ("pool", "lora"):
        save_adapters(model, os.path.join(directory, "adapters.safetensors"))
    else:
        from safetensors.torch import save_file

        tensors = {name: value.detach().contiguous().cpu() for name, value in model.state_dict().items()}
        atomic_write(os.path.join(directory, "model.safetensors"), lambda temporary: save_file(tensors, temporary))
    atomic_write(os.path.join(directory, "state.pt"), lambda temporary: torch.save(state, temporary))
    latest = {"finished_tasks": state["finished_tasks"], "directory": os.path.basename(directory)}

    def write_latest(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(latest, handle)

    atomic_write(os.path.join(os.path.dirname(directory), LATEST), write_latest)


def latest_checkpoint(run_dir: str) -> str | None:
    """The directory of the last finished task's checkpoint, or None when the run has none."""
    path = os.path.join(run_dir, CHECKPOINT_DIR, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        latest = json.load(handle)
    directory = os.path.join(run_dir, CHECKPOINT_DIR, latest["directory"])
    if not os.path.isfile(os.path.join(directory, "state.pt")):
        raise FileNotFoundError(f"{path} points at {directory!r}, which has no state.pt; the checkpoint is damaged")
    return directory


def load_state(directory: str) -> dict:
    """state.pt, on the CPU (generator states must be CPU tensors; nothing in it is needed elsewhere). Read it, and
    check it (check_resumable), before load_model_part: a changed setting is then named as such, not reported as a
    missing file or a shape mismatch."""
    return torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)


def load_model_part(directory: str, model: nn.Module, method: str, device="cpu") -> None:
    """Restore the model part into a freshly built (and, for pool/lora, freshly injected) model."""
    if method in ("pool", "lora"):
        load_adapters(model, os.path.join(directory, "adapters.safetensors"))
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors"), device=str(device)))


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameters and buffers (names, dtypes, shapes, bytes): a resumed run must start
    from the same base weights, whatever path or tag named them (the demo, run again, pre-trains into the same
    path)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
