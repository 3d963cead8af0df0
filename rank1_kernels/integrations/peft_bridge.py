"""The pool layer through peft: a LoraConfig whose custom module mapping puts a pool of rank-1 experts on every
targeted nn.Linear, so that get_peft_model, save_pretrained and merge_and_unload work as with peft's own LoRA.

    from peft import get_peft_model
    from rank1_kernels.integrations.peft_bridge import rank1_pool_lora_config

    config = rank1_pool_lora_config(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                                    r=12, lora_alpha=1.0, k=8, top_m=4)
    model = get_peft_model(model, config, autocast_adapter_dtype=False)  # bf16/fp16 models: keep the base dtype
    ...                                     # train; PoolLifecycle(model) works on the peft model too
    model = model.merge_and_unload()        # W += (alpha / r) B[:, top_m] A[top_m, :]: the weights of merge_all()

LoraConfig's r, lora_alpha and lora_dropout mean what they mean for the pool (scaling alpha / r); k (experts per
sample), top_m (experts merged), routing, gate and backend are arguments of rank1_pool_lora_config. One adapter per
model: the pool's merge history is a continual-learning state, not a set of swappable adapters.

save_pretrained writes the pools and their merge history (safetensors), not the base weights the merges went
into; loading the adapter onto the original base model re-applies the recorded merges.
save_rank1_pool_adapter also records the pool settings that adapter_config.json cannot hold:

    save_rank1_pool_adapter(model, path)                     # model.save_pretrained(path) + rank1_pool_config.json
    model = load_rank1_pool_adapter(original_model, path)    # (for a plain save_pretrained: pass k=..., top_m=...)
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ..module import _HISTORY_BUFFERS, FusedRank1PoolLinear


class SharedBasePoolLinear(FusedRank1PoolLinear):
    """A pool layer whose frozen weight and bias are the Parameters of a peft layer's base nn.Linear (not copies):
    merges write into the base layer, and its state_dict leaves them out (the base layer saves them)."""

    @classmethod
    def over(cls, base: nn.Linear, **pool_kwargs) -> "SharedBasePoolLinear":
        layer = cls(
            base.in_features, base.out_features, base.bias is not None, device=base.weight.device,
            dtype=base.weight.dtype, **pool_kwargs,
        )  # fmt: skip
        layer.weight = base.weight
        if base.bias is not None:
            layer.bias = base.bias
        return layer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)
        destination.pop(prefix + "bias", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        shared = [prefix + "weight", prefix + "bias"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        missing_keys[:] = [key for key in missing_keys if key not in shared]


class Rank1PoolLoraLinear(nn.Module, BaseTunerLayer):
    """peft tuner layer over an nn.Linear: y = base(x) + the pool's update, or base(x) alone when merged/disabled.

    The pool is `lora_pool[adapter_name]`, a FusedRank1PoolLinear sharing the base layer's weight; its parameter
    names contain "lora_", so peft trains exactly the pool (A, B and router) and saves it with the adapter."""

    adapter_layer_names = ("lora_pool",)
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig | None = None,
        r: int = 12,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        k: int = 8,
        top_m: int = 4,
        routing: str = "sample",
        gate: str = "none",
        backend: str = "auto",
        batch_first: bool = True,
        **unused_peft_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"Rank1PoolLoraLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_pool = nn.ModuleDict()
        self.top_m = top_m
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, k, routing, gate, backend, batch_first)
        if config is not None and config.inference_mode:
            # PeftModel.from_pretrained(is_trainable=False) freezes adapters through LoraLayer.set_adapter, which
            # peft calls on LoraLayer instances only: this layer freezes its pool itself.
            self.lora_pool.requires_grad_(False)
        self._active_adapter = adapter_name
        self._pools_to_remerge: list[str] = []
        self.register_load_state_dict_post_hook(Rank1PoolLoraLinear._remerge_loaded_history)

    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout, k, routing, gate, backend, batch_first) -> None:
        if self.lora_pool:
            raise ValueError(
                f"Rank1PoolLoraLinear holds one adapter; it has {list(self.lora_pool)} and was asked for "
                f"{adapter_name!r} (merge the current one first: its merges are the continual-learning history)"
            )
        self.lora_pool[adapter_name] = SharedBasePoolLinear.over(
            self.base_layer, r=r, k=k, alpha=float(lora_alpha), routing=routing, gate=gate, dropout=lora_dropout,
            backend=backend, batch_first=batch_first,
        )  # fmt: skip
        self._freeze_base()

    def _freeze_base(self) -> None:
        """peft sets requires_grad on whole adapter modules; the shared base weight must stay frozen."""
        for parameter in self.base_layer.parameters():
            parameter.requires_grad_(False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_base()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._freeze_base()

    def _active_pool(self) -> FusedRank1PoolLinear | None:
        active = [name for name in self.active_adapters if name in self.lora_pool]
        if len(active) > 1:
            raise ValueError(f"Rank1PoolLoraLinear runs one adapter at a time; active: {active}")
        return self._pool(active[0]) if active else None

    def _pool(self, adapter_name: str) -> FusedRank1PoolLinear:
        """The adapter's pool, checked to still share the base layer's weight in its dtype: peft's get_peft_model
        (autocast_adapter_dtype=True, its default) recreates a bf16/fp16 adapter's parameters in fp32, the shared
        weight included, after which merges would go into a private copy and the forward fails on mixed dtypes."""
        pool = self.lora_pool[adapter_name]
        weight = self.base_layer.weight
        if pool.weight is not weight or pool.bias is not self.base_layer.bias or pool.lora_A.dtype != weight.dtype:
            raise RuntimeError(
                f"the rank-1 pool of adapter {adapter_name!r} no longer shares its base layer's {weight.dtype} weight "
                f"(pool weight {pool.weight.dtype}, lora_A {pool.lora_A.dtype}): peft casts a half-precision model's "
                f"adapters to float32 unless told not to. Build it with get_peft_model(model, config, "
                f"autocast_adapter_dtype=False); the pool keeps its rank products in float32 anyway"
            )
        return pool

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        pool = self._active_pool()
        if self.disable_adapters or self.merged or pool is None:
            return self.base_layer(x, *args, **kwargs)
        if x.dtype != pool.weight.dtype:  # peft < 0.21 casts the shared weight itself in place, so _pool cannot tell
            raise RuntimeError(
                f"input of dtype {x.dtype} for a rank-1 pool layer whose base weight is {pool.weight.dtype}: if the "
                f"model was half precision, peft cast its adapters (and with peft < 0.21 the shared base weight) to "
                f"float32; build it with get_peft_model(model, config, autocast_adapter_dtype=False)"
            )
        return pool(x)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging `adapter_name` adds to the base weight: scaling * B[:, top_m] A[top_m, :] in the weight's
        dtype (the top_m most activated experts of the pool)."""
        pool = self._pool(adapter_name)
        top = pool.top_experts(self.top_m)
        dtype = pool._merge_dtype
        return ((pool.lora_B[:, top].to(dtype) @ pool.lora_A[top].to(dtype)) * pool.scaling).to(pool.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the top_m most activated experts into the base weight (FusedRank1PoolLinear.merge)."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.lora_pool or name in self.merged_adapters:
                continue
            pool = self._pool(name)
            if safe_merge:
                merged = pool.weight.to(pool._merge_dtype) + self.get_delta_weight(name).to(pool._merge_dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would give non-finite weights; not merged")
            pool.merge(self.top_m, reset_pool=False)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.lora_pool[self.merged_adapters.pop()].unmerge()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """An adapter state (save_pretrained, get_peft_model_state_dict) holds a pool's merge history but not the base
        weight the merges went into. Loaded without the base weight, the history replaces this layer's own: its
        merges are taken out of the base weight now, the loaded ones put in once the pool has loaded (post hook).
        With the base weight (a full state_dict) the weight already holds the loaded merges: nothing to redo."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if prefix + "base_layer.weight" in state_dict:
            return
        for name, pool in self.lora_pool.items():
            if all(f"{prefix}lora_pool.{name}.{buffer}" in state_dict for buffer in _HISTORY_BUFFERS):
                self.merged_adapters = [merged for merged in self.merged_adapters if merged != name]
                while pool.merge_sizes.numel():
                    pool.unmerge()
                self._pools_to_remerge.append(name)

    @staticmethod
    def _remerge_loaded_history(layer: "Rank1PoolLoraLinear", incompatible_keys) -> None:
        while layer._pools_to_remerge:
            layer.lora_pool[layer._pools_to_remerge.pop()].reapply_merges()

    def __repr__(self) -> str:
        return "rank1_pool." + super().__repr__()


# LoraConfig options the pool has no counterpart for, with the values that mean "off".
_UNSUPPORTED_LORA_OPTIONS = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True}


def _refuse_non_linear(base_layer: nn.Module, adapter_name: str, **unused) -> nn.Module:
    raise TypeError(
        f"rank1_pool_lora_config targets nn.Linear layers only; {type(base_layer).__name__} matched target_modules "
        f"(peft would give it its own dense LoRA, which the pool life cycle never merges): narrow target_modules"
    )


def _with_pool_layers(config: LoraConfig, k, top_m, routing, gate, backend, batch_first) -> LoraConfig:
    """`config` with peft's custom module mapping: every targeted nn.Linear becomes a Rank1PoolLoraLinear, and any
    other targeted layer an error. LoraConfig options the pool cannot honour are refused, not ignored."""
    ignored = {name: getattr(config, name) for name, off in _UNSUPPORTED_LORA_OPTIONS.items()
               if getattr(config, name, off) != off}  # fmt: skip
    if ignored:
        raise ValueError(
            f"rank1_pool_lora_config: {ignored} have no meaning for a pool of rank-1 experts (scaling is alpha / r, "
            f"A is Kaiming-initialised and B zero, the layer is an nn.Linear); leave them at their defaults"
        )
    mapping = {nn.Linear: functools.partial(
        Rank1PoolLoraLinear, k=k, top_m=top_m, routing=routing, gate=gate, backend=backend, batch_first=batch_first
    )}  # fmt: skip
    for other in (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention):
        mapping[other] = _refuse_non_linear
    try:  # GPT-2 style transposed linears
        from transformers.pytorch_utils import Conv1D

        mapping[Conv1D] = _refuse_non_linear
    except ImportError:
        pass
    config._register_custom_module(mapping)
    return config


def rank1_pool_lora_config(
    target_modules: str | Sequence[str],
    r: int = 12,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.0,
    k: int = 8,
    top_m: int = 4,
    routing: str = "sample",
    gate: str = "none",
    backend: str = "auto",
    batch_first: bool = True,
    **lora_config_kwargs,
) -> LoraConfig:
    """A LoraConfig whose targeted nn.Linear layers become Rank1PoolLoraLinear (peft's custom module mapping).

    batch_first: the layout of the targeted layers' inputs (False for OpenAI-layout MLPs, which run (tokens, batch,
    d)); the routing token of each sample is its token 0."""
    config = LoraConfig(
        target_modules=target_modules, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **lora_config_kwargs
    )
    return _with_pool_layers(config, k, top_m, routing, gate, backend, batch_first)


POOL_SETTINGS_FILE = "rank1_pool_config.json"
_POOL_SETTINGS = ("k", "top_m", "routing", "gate", "batch_first")
# Without a settings file, what rank1_pool_lora_config defaults to; k and top_m must always be known.
_SETTING_DEFAULTS = {"routing": "sample", "gate": "none", "batch_first": True}


def _pool_settings(model: nn.Module) -> dict:
    settings = set()
    for module in model.modules():
        if isinstance(module, Rank1PoolLoraLinear):
            if module.merged_adapters:
                raise ValueError(
                    "save_rank1_pool_adapter: the model is merged (peft's merge()); its merge would be saved in the "
                    "history without the flag that says it is merged, and count twice after loading: unmerge() first"
                )
            for pool in module.lora_pool.values():
                settings.add((pool.k, module.top_m, pool.routing, pool.gate, pool.batch_first))
    if not settings:
        raise ValueError("save_rank1_pool_adapter: the model has no Rank1PoolLoraLinear layers")
    if len(settings) > 1:
        raise ValueError(f"save_rank1_pool_adapter: the pool layers differ in their settings {sorted(settings)}")
    return dict(zip(_POOL_SETTINGS, settings.pop()))


def save_rank1_pool_adapter(model: PeftModel, path: str | os.PathLike, **save_pretrained_kwargs) -> None:
    """model.save_pretrained(path), plus rank1_pool_config.json with the pool settings that adapter_config.json
    cannot hold (k, top_m, routing, gate, batch_first), so that load_rank1_pool_adapter needs none of them and
    refuses conflicting ones. Refuses a merged model (peft's merge()): save unmerged."""
    import json

    from ..adapters import atomic_write

    settings = _pool_settings(model)
    model.save_pretrained(os.fspath(path), **save_pretrained_kwargs)

    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(settings, handle, indent=2)

    atomic_write(os.path.join(os.fspath(path), POOL_SETTINGS_FILE), write)


def load_rank1_pool_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    k: int | None = None,
    top_m: int | None = None,
    routing: str | None = None,
    gate: str | None = None,
    batch_first: bool | None = None,
    backend: str = "auto",
    is_trainable: bool = False,
) -> PeftModel:
    """PeftModel.from_pretrained(model, path) for an adapter saved from a rank1_pool_lora_config model.

    adapter_config.json gives the LoraConfig (targets, r, lora_alpha, ...) but not the custom module mapping (peft does
    not save it; without it peft would build its own LoRA layers) nor the pool's settings. Those come from
    rank1_pool_config.json when the adapter was saved with save_rank1_pool_adapter (a setting passed here must then
    agree with it); for a plain save_pretrained, pass k and top_m (routing, gate and batch_first default as in
    rank1_pool_lora_config). `model` is the original base model: the merges the adapter records are re-applied to its
    weights. Routing hooks are not saved: call set_text_routing again."""
    import json

    given = {"k": k, "top_m": top_m, "routing": routing, "gate": gate, "batch_first": batch_first}
    settings_path = os.path.join(os.fspath(path), POOL_SETTINGS_FILE)
    if os.path.exists(settings_path):
        with open(settings_path) as handle:
            saved_settings = json.load(handle)
        conflicts = {name: (value, saved_settings[name]) for name, value in given.items()
                     if value is not None and value != saved_settings[name]}  # fmt: skip
        if conflicts:
            described = ", ".join(
                f"{name}={passed!r} (saved: {saved!r})" for name, (passed, saved) in conflicts.items()
            )
            raise ValueError(f"load_rank1_pool_adapter: {described} disagree with {settings_path}")
        settings = saved_settings
    else:
        missing = [name for name in ("k", "top_m") if given[name] is None]
        if missing:
            raise ValueError(
                f"load_rank1_pool_adapter: {path} has no {POOL_SETTINGS_FILE} (saved with save_pretrained, which does "
                f"not record the pool settings): pass {', '.join(f'{name}=' for name in missing)} as in training, or "
                f"save with save_rank1_pool_adapter"
            )
        settings = {name: _SETTING_DEFAULTS[name] if value is None else value for name, value in given.items()}
    saved = LoraConfig.from_pretrained(os.fspath(path))
    config = _with_pool_layers(saved, settings["k"], settings["top_m"], settings["routing"], settings["gate"], backend,
                               settings["batch_first"])  # fmt: skip
    # The pool computes in the base weight's dtype and shares that weight: peft must not cast it (see _pool).
    keep_dtype = {"autocast_adapter_dtype": False} if _accepts(PeftModel.from_pretrained, "autocast_adapter_dtype") else {}
    return PeftModel.from_pretrained(model, os.fspath(path), config=config, is_trainable=is_trainable, **keep_dtype)


def _accepts(function, name: str) -> bool:
    import inspect

    return name in inspect.signature(function).parameters
