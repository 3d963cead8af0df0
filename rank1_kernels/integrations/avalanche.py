"""An Avalanche plugin that runs the pool life cycle inside any Avalanche SupervisedTemplate strategy.

    from avalanche.training.supervised import Naive
    from rank1_kernels import inject, mark_only_pool_trainable
    from rank1_kernels.integrations.avalanche import Rank1PoolPlugin

    inject(model); mark_only_pool_trainable(model)
    strategy = Naive(model, optimizer, criterion, plugins=[Rank1PoolPlugin(top_m=4, ago_weight=0.1)], ...)
    for experience in benchmark.train_stream:
        strategy.train(experience)          # fresh pools, + AGO in the loss, top_m merged after the experience

Hooks: before_training_exp -> begin_task(experience id) and the pool parameters' optimizer state cleared,
before_backward -> strategy.loss += loss_extra(),
after_training_exp -> end_task(). Importing this module imports Avalanche; `import rank1_kernels` does not.
"""

from __future__ import annotations

from avalanche.core import SupervisedPlugin

from ..inject import pool_layers
from ..lifecycle import PoolLifecycle


class Rank1PoolPlugin(SupervisedPlugin):
    """Runs a PoolLifecycle on strategy.model; its history is in state_dict() (save it beside the model's)."""

    def __init__(self, top_m: int = 4, ago_weight: float = 0.1, ago_p: int = 1, backend: str = "auto") -> None:
        super().__init__()
        self.settings = {"top_m": top_m, "ago_weight": ago_weight, "ago_p": ago_p, "backend": backend}
        self.lifecycle: PoolLifecycle | None = None
        self._pending_state: dict | None = None

    def _lifecycle_for(self, model) -> PoolLifecycle:
        if self.lifecycle is None or self.lifecycle.model is not model:
            self.lifecycle = PoolLifecycle(model, **self.settings)
            if self._pending_state is not None:
                self.lifecycle.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.lifecycle

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        self._lifecycle_for(strategy.model).begin_task(strategy.experience.current_experience)
        # Avalanche keeps the optimizer's state across experiences by default; a fresh pool must not inherit the
        # merged pool's moments and step counts (Adam's bias correction would treat it as far into training).
        optimizer = getattr(strategy, "optimizer", None)
        if optimizer is not None:
            for _, layer in pool_layers(strategy.model):
                for parameter in layer.pool_parameters():
                    optimizer.state.pop(parameter, None)

    def before_backward(self, strategy, *args, **kwargs) -> None:
        strategy.loss = strategy.loss + self._lifecycle_for(strategy.model).loss_extra()

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        self._lifecycle_for(strategy.model).end_task()

    def state_dict(self) -> dict:
        if self.lifecycle is None:
            return dict(self._pending_state or {})
        return self.lifecycle.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the history; applied now, or when the plugin first sees the strategy's model."""
        if self.lifecycle is None:
            self._pending_state = dict(state)
        else:
            self.lifecycle.load_state_dict(state)
