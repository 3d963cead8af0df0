"""The AGO loss over all pool layers of a model: a per-layer PyTorch loop (the released code's way) against our
grouped op (rank1_kernels.ago_loss_grouped) with every backend that accepts the inputs.

The layers are those of CLIP ViT-B/16 with 144 pool layers: per block of the vision tower (width 768) q, k, v,
out (d_out 768), c_fc (3072), c_proj (768); the same in the text tower (width 512). Each layer has r current
experts (top_m constrained) and `previous_tasks * top_m` merged B columns from earlier tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from typing import Iterable

import torch

from rank1_kernels import ago_loss_grouped, known_backends

from .baselines import ago_loss_loop
from .layer import DTYPES, op_refusal
from .timing import BACKWARD_NOT_CAPTURED, TimeBudget, TimingConfig, measure, timers_for


@dataclasses.dataclass
class AgoSweep:
    """widths: one tower per entry (d_model); blocks per tower; r experts, top_m constrained per layer."""

    widths: list[int] = dataclasses.field(default_factory=lambda: [768, 512])
    blocks: int = 12
    r: int = 12
    top_m: int = 4
    previous_tasks: list[int] = dataclasses.field(default_factory=lambda: [10])
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["fp32"])
    directions: list[str] = dataclasses.field(default_factory=lambda: ["forward", "backward", "forward+backward"])
    # On CUDA, also time each method captured in a CUDA graph: the GPU time without the host's launch and Python
    # overhead (144 layers of argument checks and packing), which eager timing with events includes.
    cuda_graphs: bool = False

    def layer_widths(self) -> list[int]:
        """d_out of every pool layer, in model order: per block q, k, v, out (width), c_fc (4 width), c_proj."""
        return [d for width in self.widths for _ in range(self.blocks) for d in (width,) * 4 + (4 * width, width)]


def make_ago_inputs(sweep: AgoSweep, previous_tasks: int, dtype: torch.dtype, device: torch.device):
    """B_curs (trainable), B_prevs, boolean masks and the top-m indices (for the loop) of every layer."""
    generator = torch.Generator(device=device).manual_seed(0)
    B_curs, B_prevs, cur_masks, prev_masks, tops = [], [], [], [], []
    n_prev = previous_tasks * sweep.top_m
    for d_out in sweep.layer_widths():
        B_curs.append(
            (0.02 * torch.randn(d_out, sweep.r, generator=generator, device=device, dtype=dtype)).requires_grad_()
        )
        B_prevs.append(0.02 * torch.randn(d_out, n_prev, generator=generator, device=device, dtype=dtype))
        top = torch.randperm(sweep.r, generator=generator, device=device)[: sweep.top_m].sort().values
        tops.append(top)
        cur_masks.append(torch.zeros(sweep.r, dtype=torch.bool, device=device).index_fill(0, top, True))
        prev_masks.append(torch.ones(n_prev, dtype=torch.bool, device=device))
    return B_curs, B_prevs, cur_masks, prev_masks, tops


def ago_grouped_mean(B_curs, B_prevs, cur_masks, prev_masks, backend: str) -> torch.Tensor:
    return ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, p=1, backend=backend).mean()


def _steps(loss_fn, B_curs):
    retained = {}

    def forward(_: int):
        return loss_fn()

    def backward(_: int):
        return torch.autograd.grad(retained["loss"], B_curs, retain_graph=True)

    def forward_backward(_: int):
        return torch.autograd.grad(loss_fn(), B_curs)

    def prepare():
        retained["loss"] = loss_fn()

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}, prepare


def run_ago(
    sweep: AgoSweep,
    device: torch.device,
    timing: TimingConfig,
    log=None,
    time_forced_only: bool = False,
    budget: TimeBudget | None = None,
) -> Iterable[dict]:
    budget = budget or TimeBudget()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    n_layers = len(sweep.layer_widths())
    for dtype_name in sweep.dtypes:
        for previous_tasks in sweep.previous_tasks:
            if not budget.allows(f"ago {dtype_name} previous_tasks={previous_tasks}"):
                continue
            log(f"[ago] {n_layers} layers, {previous_tasks} previous tasks, {dtype_name}")
            B_curs, B_prevs, cur_masks, prev_masks, tops = make_ago_inputs(
                sweep, previous_tasks, DTYPES[dtype_name], device
            )
            methods = {"per-layer loop": (functools.partial(ago_loss_loop, B_curs, B_prevs, tops), None)}
            for backend in known_backends():
                methods[f"grouped[{backend}]"] = (
                    functools.partial(ago_grouped_mean, B_curs, B_prevs, cur_masks, prev_masks, backend),
                    op_refusal(backend, "ago_grouped", [*B_curs, *B_prevs], time_forced_only),
                )
            timers = timers_for(device, sweep.cuda_graphs)
            rows = []
            for method, (loss_fn, refusal) in methods.items():
                steps, prepare = _steps(loss_fn, B_curs)
                for direction, timer in itertools.product(sweep.directions, timers):
                    row = dict(
                        section="ago", group="ago", method=method, dtype=dtype_name, n_layers=n_layers, r=sweep.r,
                        top_m=sweep.top_m, previous_tasks=previous_tasks, direction=direction, timer=timer,
                    )  # fmt: skip
                    if refusal is not None:
                        rows.append(dict(row, status="refused", reason=refusal))
                        continue
                    if timer == "cuda-graph" and direction == "backward":
                        rows.append(dict(row, status="skipped", reason=BACKWARD_NOT_CAPTURED))
                        continue
                    try:
                        if direction == "backward":
                            prepare()
                        measurement = measure(steps[direction], 1, device, timing, cuda_graph=timer == "cuda-graph")
                        rows.append(dict(row, status="ok", reason="", **dataclasses.asdict(measurement)))
                    except Exception as exc:  # reported in the table; the sweep goes on
                        rows.append(
                            dict(row, status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                        )
            loops = {
                (row["direction"], row["timer"]): row["median_ms"]
                for row in rows
                if row["method"] == "per-layer loop" and row["status"] == "ok"
            }
            for row in rows:
                loop = loops.get((row["direction"], row["timer"]))
                row["ratio_to_loop"] = row["median_ms"] / loop if row["status"] == "ok" and loop else None
            yield from rows
