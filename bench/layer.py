"""One linear layer, every method side by side on the same inputs: forward, backward, forward+backward.

Methods (labels as they appear in the table):
    nn.Linear               the floor: the frozen base layer alone (backward computes dx only)
    dense LoRA              x W^T + b + s (x A^T) B^T in PyTorch, all r experts
    peft LoRA               peft's lora.Linear, same r
    official (dense dW)     the released code: Delta W = s B[:, S] A[S, :] materialised, then a second full GEMM
    pool[<backend>]         FusedRank1PoolLinear with backend=<backend>, k of r experts per sample

"forward" is the training forward (autograd records the graph); "backward" is torch.autograd.grad of a
retained graph for the input and every trainable parameter (dx, dA, dB); "forward+backward" is both.
All methods hold the same W, b, A, B (B random, not zero, so no work is skipped), apply the same dropout to the LoRA
input (LayerSweep.dropout, 0 by default) and read the same buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable, Iterable

import torch
import torch.nn as nn

from rank1_kernels import FusedRank1PoolLinear, known_backends
from rank1_kernels.backends import get_backend

from .baselines import DenseLoRALinear, OfficialPoolLinear, make_peft_lora
from .environment import DevicePeaks
from .timing import (
    BACKWARD_NOT_CAPTURED,
    Measurement,
    TimeBudget,
    TimingConfig,
    buffers_to_defeat_cache,
    measure,
    timers_for,
)

DIRECTIONS = ("forward", "backward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LINEAR, DENSE, PEFT, OFFICIAL = "nn.Linear", "dense LoRA", "peft LoRA", "official (dense dW)"


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A linear layer of a real model at its real token count: rows = n_samples * tokens_per_sample."""

    model: str
    layer: str
    n_samples: int
    tokens_per_sample: int
    in_features: int
    out_features: int

    @property
    def rows(self) -> int:
        return self.n_samples * self.tokens_per_sample


@dataclasses.dataclass
class LayerSweep:
    """A grid of layer benchmarks. `group` names it in the results (the main grid, the token sweep, ...)."""

    group: str
    shapes: list[LayerShape]
    ranks: list[int]
    top_ks: list[int]
    dtypes: list[str]
    directions: list[str] = dataclasses.field(default_factory=lambda: list(DIRECTIONS))
    routings: list[str] = dataclasses.field(default_factory=lambda: ["batch"])
    methods: list[str] = dataclasses.field(default_factory=lambda: [LINEAR, DENSE, PEFT, OFFICIAL, "pool"])
    cuda_graphs: bool = False
    # Dropout on the LoRA input, the same for every method (the paper trains with 0.2; the fused kernels then read a
    # second input, the dropped-out x).
    dropout: float = 0.0
    # The pool's backends to time (None: every known one, the bench-only pinned variants included).
    backends: list[str] | None = None
    # Groups ordered r first, then shape: a time-limited run gets every shape at the smallest r before any at the
    # largest (shape first otherwise).
    rank_major: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(f"unknown dtypes {sorted(unknown)}; expected some of {sorted(DTYPES)}")
        unknown = set(self.directions) - set(DIRECTIONS)
        if unknown:
            raise ValueError(f"unknown directions {sorted(unknown)}; expected some of {DIRECTIONS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout}: expected a probability in [0, 1)")


def ideal_cost(
    shape: LayerShape, rank: int, direction: str, element_bytes: int, base_only: bool
) -> tuple[float, float]:
    """(FLOPs, bytes) the layer's math needs at minimum: the base GEMM plus a rank-`rank` LoRA (rank = k for a
    pool, r for dense LoRA), reading each operand and writing each result once.

    Forward: 2MNK + 2MKp + 2MpN. Backward: dx = gy W + dh A, dh = s gy B, dB = s gy^T h, dA = dh^T x:
    2MNK + 4MNp + 4MpK. nn.Linear (base_only) has no LoRA terms and computes dx only."""
    M, K, N = shape.rows, shape.in_features, shape.out_features
    p = 0 if base_only else rank
    forward_flops = 2 * M * N * K + 2 * M * K * p + 2 * M * p * N
    forward_bytes = (M * K + N * K + M * N + p * (K + N)) * element_bytes
    backward_flops = 2 * M * N * K + 4 * M * N * p + 4 * M * p * K
    backward_bytes = (M * N + N * K + (M * K if p else 0) + M * K + p * (K + N)) * element_bytes
    if direction == "forward":
        return forward_flops, forward_bytes
    if direction == "backward":
        return backward_flops, backward_bytes
    return forward_flops + backward_flops, forward_bytes + backward_bytes


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def make_steps(module: nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    """The three timed callables of one method, each taking a buffer index, and `prepare_backward`, which builds
    (untimed) the forward graphs that the backward step differentiates again and again (retain_graph)."""
    # allow_unused: with gate="none" the router is trainable but gets no gradient (as in the released code).
    parameters = _trainable(module)
    retained: dict[int, torch.Tensor] = {}

    def forward(i: int):
        return module(inputs[i])

    def backward(i: int):
        return torch.autograd.grad(
            retained[i], [inputs[i], *parameters], grads[i], retain_graph=True, allow_unused=True
        )

    def forward_backward(i: int):
        return torch.autograd.grad(module(inputs[i]), [inputs[i], *parameters], grads[i], allow_unused=True)

    def prepare_backward():
        for i in range(len(inputs)):
            retained[i] = module(inputs[i])

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}, prepare_backward


FORCED_ONLY = "runs these inputs only when forced and 'auto' never picks it here (e.g. a CPU interpreter); not timed"


def op_refusal(name: str, op: str, tensors: list[torch.Tensor], time_forced_only: bool = False) -> str | None:
    """None when backend `name` will run `op` on these tensors, else why not (the backend's own words). Backends
    that run the inputs only when forced (auto_ok False, e.g. Triton's CPU interpreter) count as refusing unless
    time_forced_only."""
    try:
        backend = get_backend(name)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    reason = backend.refuse_reason(op, tensors)
    if reason is None and not time_forced_only and not backend.auto_ok(op, tensors):
        return FORCED_ONLY
    return reason


def backend_refusal(
    name: str, layer: FusedRank1PoolLinear, x: torch.Tensor, time_forced_only: bool = False
) -> str | None:
    """op_refusal for this layer's pool_linear on input x (N, T, in_features)."""
    n_samples = x.shape[0]
    idx = torch.zeros(n_samples, layer.k, dtype=torch.int64, device=x.device)
    gates = torch.ones(n_samples, layer.k, dtype=x.dtype, device=x.device)
    tensors = [x.reshape(-1, layer.in_features), layer.weight, layer.bias, layer.lora_A, layer.lora_B, idx, gates]
    return op_refusal(name, "pool_linear", [t for t in tensors if t is not None], time_forced_only)


def _prototype(
    shape: LayerShape, r: int, k: int, routing: str, dtype: torch.dtype, device: torch.device, seed: int,
    dropout: float = 0.0,
):  # fmt: skip
    """The pool layer whose W, b, A, B, router and dropout every method copies. B is random (not zero) so no work is
    skipped."""
    torch.manual_seed(seed)
    layer = FusedRank1PoolLinear(
        shape.in_features, shape.out_features, r=r, k=k, routing=routing, dropout=dropout, device=device, dtype=dtype
    )
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    return layer


class LayerBenchmark:
    """Runs a LayerSweep and yields one result row (a dict) per (shape, dtype, method, r, k, direction, timer)."""

    def __init__(
        self,
        device: torch.device,
        timing: TimingConfig,
        peaks: DevicePeaks | None,
        log=None,
        time_forced_only: bool = False,
        budget: TimeBudget | None = None,
    ):
        self.device, self.timing, self.peaks, self.time_forced_only = device, timing, peaks, time_forced_only
        self.budget = budget or TimeBudget()
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    def run(self, sweep: LayerSweep) -> Iterable[dict]:
        # One group per (shape, dtype, r), each with its own nn.Linear row to compare against: a group's rows are
        # written when it ends, so groups are kept small enough (about a hundred timings at ViT-B/16 on a GPU) that
        # a time-limited call finishes some, and a resumed one moves forward.
        if sweep.rank_major:
            order = [(shape, dtype, r) for r in sweep.ranks for shape in sweep.shapes for dtype in sweep.dtypes]
        else:
            order = [(shape, dtype, r) for shape in sweep.shapes for dtype in sweep.dtypes for r in sweep.ranks]
        for shape, dtype_name, r in order:
            what = (f"layer [{sweep.group}] {shape.model} {shape.layer} {shape.rows}x{shape.in_features}->"
                    f"{shape.out_features} {dtype_name} r={r}")  # fmt: skip
            if self.budget.allows(what):
                yield from self._run_group(sweep, shape, dtype_name, r)

    def _run_group(self, sweep: LayerSweep, shape: LayerShape, dtype_name: str, r: int) -> Iterable[dict]:
        dtype = DTYPES[dtype_name]
        element_bytes = torch.finfo(dtype).bits // 8
        bytes_per_buffer = shape.rows * (shape.in_features + shape.out_features) * element_bytes
        n_buffers = buffers_to_defeat_cache(bytes_per_buffer, self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        inputs = [
            torch.randn(shape.n_samples, shape.tokens_per_sample, shape.in_features, generator=generator,
                        device=self.device, dtype=dtype).requires_grad_(True)
            for _ in range(n_buffers)
        ]  # fmt: skip
        grads = [
            torch.randn(shape.n_samples, shape.tokens_per_sample, shape.out_features, generator=generator,
                        device=self.device, dtype=dtype)
            for _ in range(n_buffers)
        ]  # fmt: skip
        self.log(
            f"[layer] {shape.model} {shape.layer} {shape.rows}x{shape.in_features}->{shape.out_features} {dtype_name} "
            f"r={r}"
        )
        base = dict(
            section="layer", group=sweep.group, model=shape.model, layer=shape.layer, n_samples=shape.n_samples,
            tokens_per_sample=shape.tokens_per_sample, rows=shape.rows, in_features=shape.in_features,
            out_features=shape.out_features, dtype=dtype_name, n_buffers=n_buffers, group_r=r, dropout=sweep.dropout,
        )  # fmt: skip
        group_rows: list[dict] = []
        floor = None
        for method, rank, k, routing, backend, module_or_reason in self._methods(sweep, shape, dtype, inputs[0], r):
            if method == LINEAR:
                floor = module_or_reason
            label = f"pool[{backend}]" if backend else method
            rank_for_cost = k if k is not None else (rank or 0)
            for direction in sweep.directions:
                row = dict(base, method=label, backend=backend, r=rank, k=k, routing=routing, direction=direction)
                for timer in timers_for(self.device, sweep.cuda_graphs):
                    result = dict(row, timer=timer)
                    if isinstance(module_or_reason, str):
                        result.update(status="refused", reason=module_or_reason)
                    elif timer == "cuda-graph" and direction == "backward":
                        result.update(status="skipped", reason=BACKWARD_NOT_CAPTURED)
                    else:
                        result.update(self._measure(module_or_reason, inputs, grads, direction, timer == "cuda-graph"))
                    if result.get("status") == "ok":
                        flops, nbytes = ideal_cost(shape, rank_for_cost, direction, element_bytes, method == LINEAR)
                        self._add_throughput(result, flops, nbytes, dtype)
                    group_rows.append(result)
        if floor is not None:
            self._time_floor_again(floor, inputs, grads, group_rows)
        _add_ratios(group_rows)
        yield from group_rows

    def _time_floor_again(self, floor: nn.Module, inputs, grads, group_rows: list[dict]) -> None:
        """Time nn.Linear again after the group's other methods: the change of its median (clocks, heat, other load)
        is recorded on every row of the same direction and timer as floor_drift, for the reports to flag. The ratios
        stay against the first timing, taken before the methods they compare."""
        for row in group_rows:
            if row["method"] == LINEAR and row.get("status") == "ok":
                again = self._measure(floor, inputs, grads, row["direction"], row["timer"] == "cuda-graph")
                if again.get("status") != "ok":
                    continue
                drift = again["median_ms"] / row["median_ms"] - 1.0
                for other in group_rows:
                    if (other["direction"], other["timer"]) == (row["direction"], row["timer"]):
                        other["floor_drift"] = drift

    def _methods(self, sweep: LayerSweep, shape: LayerShape, dtype: torch.dtype, example: torch.Tensor, r: int):
        """(method, r, k, routing, backend, module or refusal reason) for every method of the sweep at rank r, and
        nn.Linear (the same base weight whatever r: the prototypes draw it first from one seed)."""
        seed, dropout = 1234, sweep.dropout
        if LINEAR in sweep.methods:
            prototype = _prototype(shape, sweep.ranks[0], 1, "batch", dtype, self.device, seed)
            yield LINEAR, None, None, None, None, prototype.to_linear().requires_grad_(False)
        prototype = _prototype(shape, r, 1, "batch", dtype, self.device, seed, dropout)
        if DENSE in sweep.methods:
            yield DENSE, r, None, None, None, DenseLoRALinear.from_pool(prototype)
        if PEFT in sweep.methods:
            yield PEFT, r, None, None, None, _or_reason(functools.partial(make_peft_lora, prototype))
        for k in sweep.top_ks:
            if k > r:
                continue
            for routing in sweep.routings:
                prototype = _prototype(shape, r, k, routing, dtype, self.device, seed, dropout)
                if OFFICIAL in sweep.methods and routing == "batch":
                    yield OFFICIAL, r, k, "batch", None, OfficialPoolLinear(prototype)
                if "pool" not in sweep.methods:
                    continue
                for backend in known_backends():
                    if sweep.backends is not None and backend not in sweep.backends:
                        continue
                    reason = backend_refusal(backend, prototype, example, self.time_forced_only)
                    if reason is not None:
                        yield "pool", r, k, routing, backend, reason
                        continue
                    layer = _prototype(shape, r, k, routing, dtype, self.device, seed, dropout)
                    layer.backend = backend
                    yield "pool", r, k, routing, backend, layer

    def _measure(self, module: nn.Module, inputs, grads, direction: str, cuda_graph: bool) -> dict:
        module.train()
        steps, prepare_backward = make_steps(module, inputs, grads)
        try:
            if direction == "backward":
                prepare_backward()
            measurement: Measurement = measure(steps[direction], len(inputs), self.device, self.timing, cuda_graph)
        except Exception as exc:  # a method that fails here is reported in the table, the sweep goes on
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if self.device.type == "cuda":
                _recover_cuda()
            return {"status": "error", "reason": message}
        finally:
            del steps, prepare_backward  # drop the retained graphs before the next method allocates
        return {"status": "ok", "reason": "", **dataclasses.asdict(measurement)}

    def _add_throughput(self, result: dict, flops: float, nbytes: float, dtype: torch.dtype) -> None:
        seconds = result["median_ms"] / 1e3
        result.update(ideal_gflop=flops / 1e9, ideal_mbytes=nbytes / 1e6)
        result.update(tflops=flops / seconds / 1e12, gbytes_per_s=nbytes / seconds / 1e9)
        if self.peaks is not None:
            tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
            result["flops_fraction"] = flops / seconds / self.peaks.matmul_flops(dtype, tf32)
            result["bandwidth_fraction"] = nbytes / seconds / self.peaks.memory_bandwidth_bytes_per_s


def _recover_cuda() -> None:
    """After a failed method (e.g. an op that cannot be captured in a CUDA graph): wait for the device and free
    cached blocks so the next method starts clean. A capture error is not sticky, so this normally succeeds."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except RuntimeError:
        pass  # the failure itself was already recorded for this row; a sticky error fails the part, rows kept


def _or_reason(build: Callable[[], nn.Module]) -> nn.Module | str:
    try:
        return build()
    except Exception as exc:  # e.g. peft missing: the row says so instead of stopping the sweep
        return f"{type(exc).__name__}: {exc}"


def _add_ratios(rows: list[dict]) -> None:
    """time / nn.Linear's time for the same shape, dtype, direction and timer (the floor is 1.0)."""
    floors = {
        (row["direction"], row["timer"]): row["median_ms"]
        for row in rows
        if row["method"] == LINEAR and row.get("status") == "ok"
    }
    for row in rows:
        floor = floors.get((row["direction"], row["timer"]))
        ok = row.get("status") == "ok" and floor
        row["ratio_to_linear"] = row["median_ms"] / floor if ok else None
