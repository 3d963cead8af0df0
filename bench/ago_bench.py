"""The AGO loss over all pool layers of a model: a per-layer PyTorch loop (the released code's way) against our
grouped op (rank1_kernels.ago_loss_grouped) with every backend that accepts the inputs.

The layers are those of CLIP ViT-B/16 with 144 pool layers: per block of the vision tower (width 768) q, k, v,
out (d_out 768), c_fc (3072), c_proj (768); the same in the text tower (width 512). Each layer has r current
experts (top_m constrained) and `previous_tasks * top_m` merged B columns from earlier tasks.

On a GPU the iterations rotate through copies of every layer's B matrices, together twice the L2 cache (at most
MAX_INPUT_SETS copies), as the layer benchmark rotates its inputs: in training a whole forward pass runs between two
AGO evaluations and evicts them, so an AGO time measured on one set kept in L2 would be a lower bound only.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Iterable

import torch

from rank1_kernels import ago_loss_grouped, known_backends

from .baselines import ago_loss_loop
from .layer import DTYPES, op_refusal
from .timing import BACKWARD_NOT_CAPTURED, TimeBudget, TimingConfig, buffers_to_defeat_cache, measure, timers_for

# A set for 144 layers is a few MB in bf16 with one earlier task: 32 sets cover twice a 60 MB L2 from 3.75 MB on.
MAX_INPUT_SETS = 32


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


def copies_of_inputs(B_curs, B_prevs, n_sets: int) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """n_sets (B_curs, B_prevs) in distinct memory, the first the given tensors: the same values, so every set
    computes the same loss, read from other addresses."""
    sets = [(list(B_curs), list(B_prevs))]
    for _ in range(n_sets - 1):
        sets.append(([B.detach().clone().requires_grad_() for B in B_curs], [B.clone() for B in B_prevs]))
    return sets


def ago_grouped_mean(B_curs, B_prevs, cur_masks, prev_masks, backend: str) -> torch.Tensor:
    return ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, p=1, backend=backend).mean()


def _steps(loss_fn, input_sets):
    """Timed steps for loss_fn(B_curs, B_prevs): step(i) computes on input set i."""
    retained = {}

    def forward(i: int):
        return loss_fn(*input_sets[i])

    def backward(i: int):
        return torch.autograd.grad(retained[i], input_sets[i][0], retain_graph=True)

    def forward_backward(i: int):
        return torch.autograd.grad(loss_fn(*input_sets[i]), input_sets[i][0])

    def prepare():
        for i, inputs in enumerate(input_sets):
            retained[i] = loss_fn(*inputs)

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
            bytes_per_set = sum(B.numel() * B.element_size() for B in (*B_curs, *B_prevs))
            # A power of two: a CUDA graph of 8 iterations then holds whole turns of the rotation (few captures of
            # the per-layer loop's thousands of launches).
            n_sets = buffers_to_defeat_cache(bytes_per_set, device, maximum=MAX_INPUT_SETS)
            n_sets = min(MAX_INPUT_SETS, 1 << (n_sets - 1).bit_length())
            input_sets = copies_of_inputs(B_curs, B_prevs, n_sets)

            # Each method is loss(B_curs, B_prevs) of one input set.
            methods = {"per-layer loop": (lambda curs, prevs: ago_loss_loop(curs, prevs, tops), None)}
            for backend in known_backends():
                methods[f"grouped[{backend}]"] = (
                    lambda curs, prevs, backend=backend: ago_grouped_mean(curs, prevs, cur_masks, prev_masks, backend),
                    op_refusal(backend, "ago_grouped", [*B_curs, *B_prevs], time_forced_only),
                )
            timers = timers_for(device, sweep.cuda_graphs)
            rows = []
            for method, (loss_fn, refusal) in methods.items():
                steps, prepare = _steps(loss_fn, input_sets)
                for direction, timer in itertools.product(sweep.directions, timers):
                    row = dict(
                        section="ago", group="ago", method=method, dtype=dtype_name, n_layers=n_layers, r=sweep.r,
                        top_m=sweep.top_m, previous_tasks=previous_tasks, direction=direction, timer=timer,
                        n_buffers=n_sets, set_mib=round(bytes_per_set / 2**20, 2),
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
                        measurement = measure(steps[direction], n_sets, device, timing,
                                              cuda_graph=timer == "cuda-graph")  # fmt: skip
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
