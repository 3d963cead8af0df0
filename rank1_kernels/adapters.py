"""Saving and loading the adapters of an injected model as safetensors (no pickle: loading runs no code).

The file holds, per pool layer: lora_A, lora_B, the router's weight and bias, activation_counts and the merge
history (merged_A, merged_B, merged_scaling, merge_sizes), plus each layer's config as JSON metadata. The base
weights are not stored: load into a model built from the same base weights, injected the same way, and the
recorded merges are re-applied to its weights. A sketch of each merged weight (W v for a fixed random v, d_out
numbers) lets load_adapters refuse base weights that are not the saving model's, e.g. weights that hold the merges
already (a model saved after merge_all() + unload()), before it changes anything.
"""

from __future__ import annotations

import json
import os
import secrets
import stat

import torch
import torch.nn as nn

from .inject import pool_layers

FORMAT = "rank1_kernels.adapters"
FORMAT_VERSION = "1"
_LAYER_TENSORS = (
    "lora_A", "lora_B", "router.weight", "router.bias", "activation_counts",
    "merged_A", "merged_B", "merged_scaling", "merge_sizes",
)  # fmt: skip
# Settings that may differ between the saving and the loading model; they are taken from the file, since they
# change what the layer computes. Dropout is not: it acts only in training, and the loading model's choice stands.
_SETTABLE = ("k", "alpha", "routing", "gate", "routing_token_index")


SKETCH = "weight_sketch"


def _probe(in_features: int) -> torch.Tensor:
    """The fixed vector the weight sketches are taken against: pseudo-random signs in float64 from an integer hash
    of the column index (xor-shift-multiply rounds, every product below 2^63), so that no generator's stream, which
    may change between torch releases, decides whether a file loads."""
    x = torch.arange(in_features, dtype=torch.int64) + 2601_22828
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2**32
    return ((x ^ (x >> 16)) & 1).double() * 2 - 1


def _sketch(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().cpu() @ _probe(weight.shape[1])


def _check_base_weight(name: str, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Raise unless the layer's weight plus the file's merges is the saving model's merged weight, up to rounding:
    a base that holds these merges already is off by the merges themselves, another base by far more."""
    saved = tensors.get(f"{name}.{SKETCH}")
    if saved is None:  # a file written before sketches were
        return
    weight, probe = layer.weight.detach().double().cpu(), _probe(layer.in_features)
    scaled_B = tensors[f"{name}.merged_B"].double() * tensors[f"{name}.merged_scaling"].double()
    merges_on_probe = scaled_B @ (tensors[f"{name}.merged_A"].double() @ probe)
    difference = float((weight @ probe + merges_on_probe - saved.double()).norm())
    merges_size = float(merges_on_probe.norm())
    # Rounding (in the coarser of the two dtypes, another device's BLAS for the merges) moves each weight by about
    # eps |w|; against random signs that sums to about eps ||W||_F.
    eps = max(torch.finfo(layer.weight.dtype).eps, torch.finfo(tensors[f"{name}.lora_A"].dtype).eps)
    rounding = 4 * eps * float(weight.norm())
    if difference > rounding and difference > 0.5 * merges_size:
        raise ValueError(
            f"layer {name}: its base weight is not the one these adapters were saved from (with the file's "
            f"{tensors[f'{name}.merge_sizes'].numel()} merges added it misses the saving model's weight by "
            f"{difference:.3g}; the merges themselves measure {merges_size:.3g}). A model whose weights hold the "
            f"merges already (saved after merge_all() + unload(), then injected again) or another checkpoint gives "
            f"this; load into the original base weights, or pass strict=False to skip this check"
        )


def _layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    state = layer.state_dict()
    return {name: state[name] for name in _LAYER_TENSORS if name in state}


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(temporary_path), then rename it over `path`: a crash never leaves a half-written file. The data
    and the rename are flushed to disk (fsync) before returning, and the file gets the mode a plain open() would
    give it (mkstemp's is 0600, unreadable by the rest of a group on a shared machine)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = _new_temporary(directory, os.path.basename(path))
    mode = stat.S_IMODE(os.stat(temporary).st_mode)  # open()'s mode under this umask, read without setting it
    try:
        write(temporary)
        if stat.S_IMODE(os.stat(temporary).st_mode) != mode:
            os.chmod(temporary, mode)  # a writer that made the file anew (safetensors' save_file makes it 0600)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync(directory)


def _new_temporary(directory: str, name: str) -> str:
    """A new empty file beside the target, created with mode 0666 for the kernel to narrow by the umask, as open()
    does (mkstemp's 0600 would hide it from the rest of a group; reading the umask means setting it, which races
    with other threads). write() then replaces its contents, keeping the mode."""
    for _ in range(100):
        temporary = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{name}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every pool layer's adapter state to `path` (safetensors, written atomically)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    for name, layer in pool_layers(model):
        configs[name] = layer.config()
        for key, value in _layer_state(layer).items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
        tensors[f"{name}.{SKETCH}"] = _sketch(layer.weight)
    if not configs:
        raise ValueError("save_adapters(): the model has no pool layers; call inject() first")
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "layers": json.dumps(configs)}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_adapters(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load adapters saved by save_adapters into an injected model; returns the names of the loaded layers.

    The model's layers must have no merges yet (their base weights pristine): the file's merges are added to
    them. With strict, the file and the model must hold the same pool layers, and each base weight must be the
    saving model's (checked against the file's weight sketches, up to rounding; another dtype or device is fine).
    Each layer's routing settings (k, alpha, routing, gate, routing_token_index) become the file's, those its pool
    was trained with, whatever the model was injected with; r must match (it shapes the tensors)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a rank1_kernels adapter file (metadata format={metadata.get('format')!r})")
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has adapter format version {metadata.get('version')!r}; expected {FORMAT_VERSION}")
        configs = json.loads(metadata["layers"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    layers = dict(pool_layers(model))
    missing, unexpected = sorted(set(layers) - set(configs)), sorted(set(configs) - set(layers))
    if strict and (missing or unexpected):
        raise ValueError(
            f"adapter file and model disagree: pool layers missing from the file {missing[:5]}, in the file but not "
            f"in the model {unexpected[:5]} (of {len(missing)} and {len(unexpected)}); inject the model the same way"
        )
    # Every check before any layer changes: a refused file leaves the model as it was.
    for name, config in configs.items():
        layer = layers.get(name)
        if layer is None:
            continue
        for field in ("in_features", "out_features", "r"):
            if config[field] != getattr(layer, field):
                raise ValueError(f"layer {name}: {field}={config[field]} in the file but {getattr(layer, field)} in the model")
        if layer.merge_sizes.numel():
            raise ValueError(
                f"layer {name} already has {layer.merge_sizes.numel()} merges; load adapters into a freshly injected "
                f"model whose base weights are the original ones"
            )
        if strict:
            _check_base_weight(name, layer, tensors)
    loaded = []
    for name, config in configs.items():
        layer = layers.get(name)
        if layer is None:
            continue
        for field in _SETTABLE:
            setattr(layer, field, config[field])
        state = {key: tensors[f"{name}.{key}"] for key in _LAYER_TENSORS if f"{name}.{key}" in tensors}
        layer.load_state_dict(state, strict=False)
        layer.reapply_merges()
        loaded.append(name)
    return loaded
