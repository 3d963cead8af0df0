"""Host time of eager calls of the pool layer and the grouped AGO loss, on CPU, without a GPU.

    python -m bench.host_overhead [--samples N] [--launch-path] [--json FILE]

In eager mode the host runs each layer's Python, checks, dispatch and torch ops, then launches the kernels; at
ViT-B/16 shapes that takes longer than the kernels take on an H100, so a step is bound by the host. This times that
host path alone. By default the Triton kernels are swapped for no-ops. With --launch-path each kernel call goes
through Triton's own launch path instead (binding and specializing the arguments, the cache lookup) up to the driver
launch, for a stand-in sm_90 device; the kernels are compiled for sm_90 on first use (minutes). On a GPU, the bench's
`events` rows show about the larger of the host's time and the GPU's (the host issues a call while the GPU runs the
one before), its `cuda-graph` rows the GPU's alone: where events exceed the CUDA graph, the host is the slower, by
that much; where they agree, the host's time is hidden (and unmeasured there).

Shapes are tiny, so the torch ops that do run cost their dispatch, as launches do on a GPU. The checks that read
values back (finite routing scores, expert range) are switched off, as they are on a GPU by default. Compare
numbers from one machine and one run only (`--json` keeps them). It must run in its own process: it sets
TRITON_INTERPRET before Triton is imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

KERNELS = {
    "rank1_kernels.triton_pool_linear": ("_shrink_kernel", "_fused_linear_kernel", "_group_outer_kernel",
                                         "_gate_grad_kernel", "_scatter_slots_kernel"),
    "rank1_kernels.triton_ago": ("_ago_gram_kernel", "_ago_grad_kernel"),
    "rank1_kernels.triton_routing": ("_route_kernel", "_router_grad_kernel"),
}  # fmt: skip


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _LaunchPathOnly:
    """`kernel[grid](*args)` runs Triton's launch path (bind, specialize, look up the compiled kernel) and stops
    before the driver launch: JITFunction.run with warmup=True."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel.run(*args, grid=grid, warmup=True, **kwargs)


class _StandInSm90:
    """The few calls of Triton's active driver that the launch path makes, for a device that is not here."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def replace_kernels(launch_path: bool) -> None:
    """Swap every kernel the Triton backend launches (checked against KERNELS) for a no-op or its launch path."""
    kind = "JITFunction" if launch_path else "InterpretedFunction"
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        launched = {name for name, obj in vars(module).items()
                    if name.endswith("_kernel") and type(obj).__name__ == kind}  # fmt: skip
        if launched != set(names):
            raise SystemExit(f"bench.host_overhead: {module_name} launches {sorted(launched)}; update KERNELS")
        for name in names:
            setattr(module, name, _LaunchPathOnly(getattr(module, name)) if launch_path else _NoLaunch())
    if launch_path:
        from triton.runtime import driver

        driver.set_active(_StandInSm90())
        # The backend takes CPU tensors only under the interpreter; here they stand in for device tensors.
        importlib.import_module("rank1_kernels.triton_backend").is_interpreted = lambda: True
    importlib.import_module("rank1_kernels.routing").check_finite_scores = lambda scores: None
    importlib.import_module("rank1_kernels.triton_backend")._may_read_back = lambda tensor: False
    importlib.import_module("rank1_kernels.pool_linear").check_expert_range = lambda idx, n_experts: None


def median_us(call: Callable[[], object], samples: int, warmup: int = 50) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(samples: int) -> dict[str, float]:
    """Median microseconds per call: pool layers (mask variant at r = 12, gather at r = 64; gate "none", and a
    softmax-gated one at r = 12 whose backward includes the router's gradient) and nn.Linear, forward and
    forward+backward; the grouped AGO loss over 144 layers (ViT-B/16's d_out / 64, so that copies stay small)."""
    import torch
    from torch import nn

    from rank1_kernels import FusedRank1PoolLinear, ago_loss_grouped

    torch.manual_seed(0)
    results = {}
    x = torch.randn(3, 20, 16, requires_grad=True)
    linear = nn.Linear(16, 16).requires_grad_(False)
    for r, gate in ((12, "none"), (64, "none"), (12, "softmax")):
        layer = FusedRank1PoolLinear.from_linear(linear, r=r, k=4, gate=gate, backend="triton").train()
        params = (x, layer.lora_A, layer.lora_B, *layer.router.parameters()) if gate != "none" else (
            x, layer.lora_A, layer.lora_B)  # fmt: skip

        def forward_backward(layer=layer, params=params):
            y = layer(x)
            torch.autograd.grad(y, params, torch.ones_like(y))

        name = f"pool r={r}" + (f" {gate}" if gate != "none" else "")
        results[f"{name} forward"] = median_us(lambda layer=layer: layer(x), samples)
        results[f"{name} forward+backward"] = median_us(forward_backward, samples)

    def linear_forward_backward():
        y = linear(x)
        torch.autograd.grad(y, (x,), torch.ones_like(y))

    results["nn.Linear forward"] = median_us(lambda: linear(x), samples)
    results["nn.Linear forward+backward"] = median_us(linear_forward_backward, samples)

    g = torch.Generator().manual_seed(0)
    d_outs = ([12] * 5 + [48] + [8] * 5 + [32]) * 12
    B_curs = [torch.randn(d, 12, generator=g, requires_grad=True) for d in d_outs]
    B_prevs = [torch.randn(d, 4, generator=g) for d in d_outs]
    cur_masks = [torch.rand(12, generator=g) > 0.5 for _ in d_outs]
    prev_masks = [torch.ones(4, dtype=torch.bool) for _ in d_outs]

    def ago():
        losses = ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks, p=1, backend="triton")
        torch.autograd.grad(losses.sum(), B_curs)

    results["AGO 144 layers forward+backward"] = median_us(ago, max(samples // 10, 5))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="timed calls per row (AGO: a tenth)")
    launch_help = "count Triton's launch path up to the driver (kernels compiled for sm_90 on first use)"
    parser.add_argument("--launch-path", action="store_true", help=launch_help)
    parser.add_argument("--json", help="also write the medians to this file")
    args = parser.parse_args(argv)
    if args.samples < 1:
        raise SystemExit(f"--samples {args.samples}: expected a positive number")
    if "triton" in sys.modules:
        raise SystemExit("bench.host_overhead: Triton was imported already; run it in a process of its own")
    os.environ["TRITON_INTERPRET"] = "0" if args.launch_path else "1"
    import torch
    import triton

    torch.set_num_threads(1)
    replace_kernels(args.launch_path)
    results = measure(args.samples)
    for name, value in results.items():
        print(f"{name:40s} {value:10.1f} us")
    if args.json:  # with where and what ran, so a quoted figure can name its machine, versions and commit
        from bench.environment import environment

        where = environment(torch.device("cpu"))
        assert where["triton"] == triton.__version__
        document = {**where, "launch_path": args.launch_path, "samples": args.samples, "median_us": results}
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
