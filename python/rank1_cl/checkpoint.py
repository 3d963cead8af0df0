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

import errno
import hashlib
import json
import logging
import os
import random
import re

import numpy as np
import torch
import torch.nn as nn

from rank1_kernels import load_adapters, save_adapters
from rank1_kernels.adapters import atomic_write

logger = logging.getLogger("rank1_cl")

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


WAY_OUT = "point checkpoints/latest.json at an earlier task's directory that holds a state.pt, or start a new run directory"


def latest_checkpoint(run_dir: str) -> str | None:
    """The directory of the last finished task's checkpoint, or None when the run has none. Without latest.json
    (deleted, or a crash between the first task's state.pt and it), the last task directory holding a state.pt."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        finished = sorted(name for name in (os.listdir(root) if os.path.isdir(root) else [])
                          if name.startswith("task_") and os.path.isfile(os.path.join(root, name, "state.pt")))  # fmt: skip
        if not finished:
            return None
        logger.warning("%s is missing: resuming from the last task directory with a state.pt, %s", path, finished[-1])
        return os.path.join(root, finished[-1])
    try:
        with open(path) as handle:
            latest = json.load(handle)
        directory = os.path.join(root, latest["directory"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is damaged ({type(error).__name__}: {error}); it should read "
            f'{{"finished_tasks": N, "directory": "task_..."}}: {WAY_OUT}'
        ) from error
    if not os.path.isfile(os.path.join(directory, "state.pt")):
        raise FileNotFoundError(f"{path} points at {directory!r}, which has no state.pt; {WAY_OUT}")
    return directory


# What state.pt must hold for a run to continue from it (and what its results must hold).
STATE_KEYS = ("finished_tasks", "rng", "results", "config")
RESULTS_KEYS = ("tasks", "matrices", "zero_shot", "seconds_per_step", "final_loss", "merged_experts")


def load_state(directory: str) -> dict:
    """state.pt, on the CPU (generator states must be CPU tensors; nothing in it is needed elsewhere). Read it, and
    check it (check_resumable), before load_model_part: a changed setting is then named as such, not reported as a
    missing file or a shape mismatch. A file that cannot be read, holds anything but tensors and containers (the
    weights-only unpickler refuses code), or lacks what a run needs is refused, naming it."""
    path = os.path.join(directory, "state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, random bytes, a pickle with code: all end the same way
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {_first_line(error)}); {WAY_OUT}") from error
    problem = None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        problem = f"expected a dict with the keys {STATE_KEYS}"
    elif not isinstance(state["results"], dict) or any(key not in state["results"] for key in RESULTS_KEYS):
        problem = f"its results lack some of {RESULTS_KEYS}"
    elif len(state["results"]["matrices"].get("mtil", [])) != state["finished_tasks"]:
        problem = (f"it records {state['finished_tasks']} finished task(s) but "
                   f"{len(state['results']['matrices'].get('mtil', []))} accuracy row(s)")  # fmt: skip
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not a run's state: {problem}; {WAY_OUT}")
    return state


def load_model_part(directory: str, model: nn.Module, method: str, device="cpu") -> None:
    """Restore the model part into a freshly built (and, for pool/lora, freshly injected) model; a file that cannot
    be read is refused, naming it."""
    name = "adapters.safetensors" if method in ("pool", "lora") else "model.safetensors"
    path = os.path.join(directory, name)
    try:
        if method in ("pool", "lora"):
            load_adapters(model, path)
        else:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(path, device=str(device)))
    except ValueError as error:  # the adapters' own refusals (another base model, ...): their words, with the file
        raise ValueError(f"checkpoint {path}: {error}") from error
    except Exception as error:
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {_first_line(error)}); {WAY_OUT}") from error


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


class RunDirectoryInUse(OSError):
    """Another run holds the run directory's lock."""


LOCK_FILE = ".lock"


# flock's errors on filesystems that do not support it (some NFS, Lustre and CIFS mounts): run without the lock.
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_run_directory(run_dir: str) -> int | None:
    """Make the run directory, check that it is writable, and take its lock for the whole run (rank 0): a second run
    on the same directory would overwrite the first's checkpoints and results. Leftover temporary files of a run
    killed while writing are removed (no other run can be writing: the lock is ours). Returns the lock's descriptor
    (unlock_run_directory releases it; the system does when the process ends, however it ends), or None where the
    filesystem has no locks (with a warning: two runs there are not kept apart)."""
    import fcntl

    try:
        os.makedirs(run_dir, exist_ok=True)
        descriptor = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise OSError(f"run directory {run_dir!r} cannot be written ({error.strerror or error}); choose another --run-dir") from error
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryInUse(
                f"run directory {run_dir!r} is in use by another run (pid {holder}); wait for it to end, or choose "
                f"another --run-dir"
            ) from None
        except OSError as error:
            if error.errno not in _NO_LOCKING:
                raise
            logger.warning("%s: the filesystem has no file locks (%s); a second run on it would not be refused",
                           run_dir, error.strerror)  # fmt: skip
            os.close(descriptor)
            descriptor = None
        else:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        _remove_stale_temporaries(run_dir)
    except BaseException:
        if descriptor is not None:
            os.close(descriptor)  # a refusal or a failed write leaves no descriptor (nor lock) behind
        raise
    return descriptor


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{16}-")  # atomic_write's temporaries: .tmp-<16 hex digits>-<name>


def _remove_stale_temporaries(run_dir: str) -> None:
    """atomic_write's temporaries in the folders a run writes (not below them: a run directory may be any folder)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    folders = [run_dir, root]
    if os.path.isdir(root):
        folders += [os.path.join(root, name) for name in os.listdir(root) if name.startswith("task_")]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if _TEMPORARY.match(name) and os.path.isfile(path):
                os.remove(path)


def unlock_run_directory(descriptor: int | None) -> None:
    import fcntl

    if descriptor is None:  # a filesystem without locks: nothing was taken
        return
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


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
