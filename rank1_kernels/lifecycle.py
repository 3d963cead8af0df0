"""The continual-learning life cycle of an injected model, as hooks any trainer can call.

    lifecycle = PoolLifecycle(model, top_m=4, ago_weight=0.1)
    for task_id, task in enumerate(tasks):
        lifecycle.begin_task(task_id)                 # a fresh pool in every layer
        for batch in task:
            loss = task_loss(model, batch) + lifecycle.loss_extra()   # + lambda * AGO (zero on the first task)
            ...
        lifecycle.end_task()                          # merge each layer's top_m experts into its weight

The pool tensors and the merge history are buffers of the pool layers, so they travel in model.state_dict()
(or save_adapters); this object's state_dict() holds the rest of the history: which tasks ran, the activation
counts each layer had at the end of each task and the experts merged.

begin_task redraws the pools in place (the same Parameter objects): an optimizer kept across tasks would carry
its moments (Adam's exp_avg, ...) into the fresh pool. Make a new optimizer per task, or clear its state for
pool_parameters() of every layer (the Avalanche plugin does).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .inject import ago_penalty, check_top_m, merge_all, pool_layers


def _data_parallel() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_rank_0(tensors) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


class PoolLifecycle:
    """sync_ranks: under torch.distributed (more than one process), begin_task gives every rank rank 0's fresh pools
    and end_task merges the experts rank 0's counts choose, so that data-parallel replicas stay one model (each rank
    draws its own pools and counts its own slice of the data). Both are then collective calls that every rank must
    make. To merge what one process on the global batch would, also sum the count increments across ranks after
    every forward (rank1_cl does; docs/INTEGRATING.md). sync_ranks=False for processes that train separate models."""

    def __init__(self, model: nn.Module, top_m: int = 4, ago_weight: float = 0.1, ago_p: int = 1, backend: str = "auto",
                 sync_ranks: bool = True):  # fmt: skip
        if not any(True for _ in pool_layers(model)):
            raise ValueError("PoolLifecycle needs a model with pool layers; call rank1_kernels.inject(model) first")
        check_top_m(model, top_m)  # now, not after a task has trained
        self.model = model
        self.top_m, self.ago_weight, self.ago_p, self.backend = top_m, ago_weight, ago_p, backend
        self.sync_ranks = sync_ranks
        self.finished_tasks: list = []
        self.current_task = None
        self.counts_per_task: dict[str, list[torch.Tensor]] = {}
        self.merged_experts_per_task: dict[str, list[torch.Tensor]] = {}

    def begin_task(self, task_id) -> None:
        """Start a task: every pool layer gets a fresh pool (new A, zero B, new router, zero counts)."""
        if self.current_task is not None:
            raise RuntimeError(f"begin_task({task_id!r}) while task {self.current_task!r} is running; call end_task() first")
        check_top_m(self.model, self.top_m)  # layers may have been injected since the lifecycle was made
        for _, layer in pool_layers(self.model):
            layer.reset_pool()
        if self.sync_ranks and _data_parallel():
            _from_rank_0(p for _, layer in pool_layers(self.model) for p in layer.pool_parameters())
        self.current_task = task_id

    def loss_extra(self) -> torch.Tensor:
        """ago_weight * the AGO penalty averaged over pool layers; exactly zero before any task has been merged.
        Whether merges exist is read off the model (a shape, no device sync), not this object's history: a model
        restored from its state_dict or an adapter file under a new lifecycle keeps its AGO term."""
        layers = [layer for _, layer in pool_layers(self.model)]
        if self.ago_weight == 0 or not any(layer.merged_B.shape[1] for layer in layers):
            return layers[0].lora_B.new_zeros(())
        return self.ago_weight * ago_penalty(self.model, top_m=self.top_m, p=self.ago_p, backend=self.backend)

    def end_task(self, top_m: int | None = None) -> dict[str, torch.Tensor]:
        """Merge each layer's top_m most used experts into its weight; returns the merged indices per layer."""
        if self.current_task is None:
            raise RuntimeError("end_task() without begin_task()")
        top_m = self.top_m if top_m is None else top_m
        if self.sync_ranks and _data_parallel():
            _from_rank_0(layer.activation_counts for _, layer in pool_layers(self.model))
        counts = {name: layer.activation_counts.detach().cpu().clone() for name, layer in pool_layers(self.model)}
        merged = merge_all(self.model, top_m=top_m, reset_pool=True)  # checks top_m first: a refusal changes nothing
        for name, layer_counts in counts.items():
            self.counts_per_task.setdefault(name, []).append(layer_counts)
        for name, experts in merged.items():
            self.merged_experts_per_task.setdefault(name, []).append(experts.detach().cpu().clone())
        self.finished_tasks.append(self.current_task)
        self.current_task = None
        return merged

    def state_dict(self) -> dict:
        return {
            "top_m": self.top_m, "ago_weight": self.ago_weight, "ago_p": self.ago_p,
            "finished_tasks": list(self.finished_tasks), "current_task": self.current_task,
            "counts_per_task": {name: torch.stack(v) for name, v in self.counts_per_task.items()},
            # A list per layer: end_task(top_m=...) may merge a different number of experts each task.
            "merged_experts_per_task": {name: list(v) for name, v in self.merged_experts_per_task.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore the history saved by state_dict(); its layers must be this model's pool layers."""
        layers = {name for name, _ in pool_layers(self.model)}
        for key in ("counts_per_task", "merged_experts_per_task"):
            saved = set(state[key])
            if saved and saved != layers:
                missing, extra = sorted(layers - saved), sorted(saved - layers)
                problems = [f"{what} {names[:4]}{' ...' if len(names) > 4 else ''}" for what, names in (
                    ("nothing for the model's", missing), ("entries for layers the model lacks:", extra)) if names]  # fmt: skip
                raise ValueError(
                    f"the lifecycle state's {key} is for other pool layers than this model's: {'; '.join(problems)}. "
                    f"Inject the same layers as the saved run"
                )
        check_top_m(self.model, state["top_m"])
        self.top_m, self.ago_weight, self.ago_p = state["top_m"], state["ago_weight"], state["ago_p"]
        self.finished_tasks = list(state["finished_tasks"])
        self.current_task = state["current_task"]
        self.counts_per_task = {name: list(v.unbind(0)) for name, v in state["counts_per_task"].items()}
        # Checkpoints from before varying top_m hold one stacked tensor per layer; unbind gives the same list.
        self.merged_experts_per_task = {
            name: list(v.unbind(0)) if isinstance(v, torch.Tensor) else list(v)
            for name, v in state["merged_experts_per_task"].items()
        }
