"""rank1_kernels: fused kernels and a drop-in layer for pools of rank-1 LoRA experts (arXiv 2601.22828).

Layers, from the bottom:
    routing, pool_linear, ago     ops: a plain-PyTorch reference beside each, validated dispatch to a backend
    backends                      who runs an op (reference | triton | cuda) and why one refuses
    module, attention             FusedRank1PoolLinear (drop-in nn.Linear), PoolMultiheadAttention
    inject, adapters              model surgery, merging, the AGO penalty, safetensors save/load
    families                      the model families inject() recognises, towers, end-of-text routing
    lifecycle                     begin_task / loss_extra / end_task hooks for any trainer
"""

from ._checks import set_device_sync_checks
from ._compile_cache import tag_compile_caches
from .adapters import load_adapters, save_adapters
from .ago import ago_loss, ago_loss_grouped, ago_loss_grouped_ref, ago_loss_ref
from .attention import PoolMultiheadAttention
from .backends import available_backends, known_backends, register_backend, resolve_backend
from .families import detect_family, find_towers, set_text_routing
from .inject import (
    DEFAULT_TARGETS,
    PoolConfig,
    ago_penalty,
    current_top_masks,
    inject,
    mark_only_pool_trainable,
    merge_all,
    pool_layers,
    unload,
)
from .lifecycle import PoolLifecycle
from .module import FusedRank1PoolLinear
from .pool_linear import rank1_pool_linear, rank1_pool_linear_ref
from .routing import route, top_experts

__version__ = "0.1.0"

# torch.compile's caches do not key custom ops by their autograd code: see _compile_cache.
tag_compile_caches()

__all__ = [
    "DEFAULT_TARGETS",
    "FusedRank1PoolLinear",
    "PoolConfig",
    "PoolLifecycle",
    "PoolMultiheadAttention",
    "ago_loss",
    "ago_loss_grouped",
    "ago_loss_grouped_ref",
    "ago_loss_ref",
    "ago_penalty",
    "current_top_masks",
    "available_backends",
    "detect_family",
    "find_towers",
    "inject",
    "known_backends",
    "load_adapters",
    "mark_only_pool_trainable",
    "merge_all",
    "pool_layers",
    "rank1_pool_linear",
    "rank1_pool_linear_ref",
    "register_backend",
    "resolve_backend",
    "route",
    "save_adapters",
    "set_device_sync_checks",
    "set_text_routing",
    "top_experts",
    "unload",
]
