"""Compile every Triton kernel for sm_80 and sm_90 GPUs with no GPU present, and check what the compiled fused GEMM
and routing kernel cost in resources on sm_90 (H100/H200, where the speed targets are). Run in a process without
TRITON_INTERPRET (tests/test_triton_pool_linear.py does; a kernel engineer can too):

    TRITON_INTERPRET=0 python tests/triton_aot.py            # compile all, check resources; prints "compiled"
    TRITON_INTERPRET=0 python tests/triton_aot.py --report   # also print the resource tables

Triton's GPU compiler checks what the interpreter does not (tl.dot operand shapes and dtypes, loop bounds, shared
memory). The resource check compiles the fused GEMM as the JIT specializes it for a real launch (unit strides are
constants, pointers and 16-multiple sizes divisible by 16), at the launch settings `gemm_tiles` picks for a ViT-B/16
layer, and asks ptxas: no register spills, the K loop pipelined (shared memory for at least two stages of tiles),
and in half precision the rank products on tensor cores (wgmma), not fp32 FMAs on the CUDA cores.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from rank1_kernels import triton_ago as ta
from rank1_kernels import triton_pool_linear as tp
from rank1_kernels import triton_routing as tr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DOT_PRECISION = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # what _dot_config gives compiled kernels
# A half-precision fused GEMM may keep a few scalar FMAs (address and gate arithmetic), never a tile product.
MAX_HALF_PRECISION_FMAS = 64


def compile_for_gpu(kernel, arch, pointers, constants, divisible=(), **options):
    """triton.compile for sm_<arch>: `pointers` maps pointer arguments to their types (other arguments i32,
    `scaling` fp32), `constants` the constexprs, `divisible` the arguments the JIT would mark divisible by 16."""
    signature = {
        name: "constexpr" if name in constants else pointers.get(name, "fp32" if name == "scaling" else "i32")
        for name in kernel.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in divisible and name not in constants}  # fmt: skip
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def fused_linear_pointers(t: str) -> dict:
    return {"x_ptr": t, "w_ptr": t, "bias_ptr": t, "u_ptr": "*fp32", "shrink_in_ptr": t, "proj_ptr": t,
            "gate_ptr": t, "expand_ptr": t, "idx_ptr": "*i64", "y_ptr": t}  # fmt: skip


def fused_linear_flags(shrink: bool, own_input: bool, dtype: str, tiles, block_slots: int = 32,
                       span: bool = False, dense: bool = True) -> dict:  # fmt: skip
    return {"HAS_BASE": True, "HAS_BIAS": True, "HAS_LORA": True, "SHRINK": shrink, "SHRINK_OWN_INPUT": own_input,
            "SPAN_SAMPLES": span, "DENSE_SLOTS": dense, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
            "BLOCK_K": tiles.block_k, "BLOCK_SLOTS": block_slots,
            "RANK_DOT": tp._RANK_DOT[DTYPES[dtype]], "DOT_PRECISION": DOT_PRECISION[dtype],
            "UPCAST_DOT": False}  # fmt: skip


def compile_all(arch: int) -> None:
    """Every kernel, every dtype, the fused GEMM with and without its in-loop shrink."""
    for dtype in DTYPES:
        t = "*" + dtype
        dot = {"DOT_PRECISION": DOT_PRECISION[dtype], "UPCAST_DOT": False}
        for dense in (False, True):
            compile_for_gpu(tp._shrink_kernel, arch, {"in_ptr": t, "proj_ptr": t, "idx_ptr": "*i64",
                            "out_ptr": "*fp32"}, {"DENSE_SLOTS": dense, "BLOCK_M": 64, "BLOCK_SLOTS": 16, "BLOCK_D": 64,
                            **dot})  # fmt: skip
        tiles = tp.gemm_tiles(DTYPES[dtype], 4096, 4096, 4096)
        # (shrink in the K loop, its own input, tiles across samples, mask variant's dense slots)
        for shrink, own_input, span, dense in ((False, False, False, True), (False, False, False, False),
                                               (False, False, True, False), (True, False, False, True),
                                               (True, False, False, False), (True, True, False, True)):  # fmt: skip
            compile_for_gpu(tp._fused_linear_kernel, arch, fused_linear_pointers(t),
                            fused_linear_flags(shrink, own_input, dtype, tiles, span=span, dense=dense),
                            num_warps=tiles.num_warps, num_stages=tiles.num_stages)  # fmt: skip
        outer = {"u_a_ptr": "*fp32", "m_a_ptr": t, "out_a_ptr": "*fp32", "u_b_ptr": "*fp32", "m_b_ptr": t,
                 "out_b_ptr": "*fp32", "gate_ptr": t, "idx_ptr": "*i64"}  # fmt: skip
        # The two problems' strides specialized alike, and differently (a unit stride becomes a constant for one).
        for dense, a_row_stride in itertools.product((False, True), ({}, {"stride_m_a_row": 1})):
            compile_for_gpu(tp._group_outer_kernel, arch, outer, {"DENSE_SLOTS": dense, "BLOCK_M": 32,
                            "BLOCK_SLOTS": 16, "BLOCK_C": 64, "RANK_DOT": tp._RANK_DOT[DTYPES[dtype]],
                            "UPCAST_DOT": False, "stride_m_a_col": 1, "stride_m_b_col": 1, **a_row_stride})  # fmt: skip
        for dense in (False, True):
            compile_for_gpu(tp._gate_grad_kernel, arch, {"u_ptr": "*fp32", "grad_u_ptr": "*fp32", "idx_ptr": "*i64",
                            "out_ptr": t}, {"DENSE_SLOTS": dense, "BLOCK_M": 64, "BLOCK_K": 16})  # fmt: skip
        scatter = {"partial_a_ptr": "*fp32", "out_a_ptr": t, "partial_b_ptr": "*fp32", "out_b_ptr": t,
                   "table_ptr": "*i64"}  # fmt: skip
        for dense, b_col_stride in itertools.product((False, True), ({}, {"stride_out_b_col": 1})):
            compile_for_gpu(tp._scatter_slots_kernel, arch, scatter, {"DENSE_SLOTS": dense, "BLOCK_P": 16,
                            "BLOCK_C": 64, "stride_out_a_col": 1, **b_col_stride})  # fmt: skip
        masks = {"cur_mask_ptr": "*fp32", "prev_mask_ptr": "*fp32", "table_ptr": "*i64"}
        compile_for_gpu(ta._ago_gram_kernel, arch, {"cur_ptr": t, "prev_ptr": t, "loss_ptr": "*fp32",
                        "dphi_ptr": "*fp32", **masks},
                        {"P": 1, "BLOCK_R": 16, "BLOCK_M": 32, "BLOCK_D": 64})  # fmt: skip
        compile_for_gpu(ta._ago_grad_kernel, arch, {"grad_loss_ptr": "*fp32", "own_ptr": t, "other_ptr": t,
                        "own_mask_ptr": "*fp32", "other_mask_ptr": "*fp32", "table_ptr": "*i64", "dphi_ptr": "*fp32",
                        "out_ptr": t}, {"OWN_IS_CUR": True, "BLOCK_D": 64, "BLOCK_A": 16, "BLOCK_B": 32})  # fmt: skip
        # Routing: both modes, every gate, with and without bias and counts, from the fewest experts to the most.
        for batch, gate, has_bias, count, experts in itertools.product(
            (False, True), tr.GATE_CODES.values(), (False, True), (False, True), (16, tr.MAX_EXPERTS)
        ):
            compile_route(arch, dtype, batch, has_bias, count, experts, gate=gate)
        # The router's gradient through learned gates: each gradient alone or all three; the other gate at the most
        # experts.
        for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
            compile_route_grad(arch, dtype, 1, needs, 16)
        compile_route_grad(arch, dtype, 2, (True, True, True), tr.MAX_EXPERTS)


def compile_route(arch: int, dtype: str, batch: bool, has_bias: bool, count: bool, n_experts: int, d_in: int = 768,
                  gate: int = 0, k: int = 8):  # fmt: skip
    """The routing kernel at the launch settings `route_launch` picks."""
    t = "*" + dtype
    settings = dict(tr.route_launch(n_experts, d_in))
    launch = {"num_warps": settings.pop("num_warps"), "num_stages": settings.pop("num_stages")}
    # Without learned gates (gate 0) idx stands in for the gate pointers, as at a launch.
    gate_types = (t, "*fp32") if gate else ("*i64", "*i64")
    pointers = {"tok_ptr": t, "w_ptr": t, "bias_ptr": t, "idx_ptr": "*i64", "counts_ptr": "*i64",
                "gate_ptr": gate_types[0], "gate32_ptr": gate_types[1]}  # fmt: skip
    constants = {"HAS_BIAS": has_bias, "COUNT": count, "BATCH": batch, "GATE": gate, "BLOCK_K": tr._slots_block(k),
                 **settings, "DOT_PRECISION": DOT_PRECISION[dtype], "UPCAST_DOT": False}  # fmt: skip
    return compile_for_gpu(tr._route_kernel, arch, pointers, constants, **launch)


def compile_route_grad(arch: int, dtype: str, gate: int, needs: tuple, n_experts: int, d_in: int = 768, k: int = 8):
    """The router's gradient kernel at the launch settings `route_launch` picks. Gradients not needed get idx as
    their stand-in pointer, as at a launch."""
    t = "*" + dtype
    settings = dict(tr.route_launch(n_experts, d_in))
    launch = {"num_warps": settings.pop("num_warps"), "num_stages": settings.pop("num_stages")}
    outputs = {name: t if needed else "*i64"
               for name, needed in zip(("grad_tok_ptr", "grad_w_ptr", "grad_bias_ptr"), needs)}  # fmt: skip
    pointers = {"grad_gate_ptr": t, "gate32_ptr": "*fp32", "idx_ptr": "*i64", "tok_ptr": t, "w_ptr": t, **outputs}
    constants = {"GATE": gate, "NEED_TOKENS": needs[0], "NEED_WEIGHT": needs[1], "NEED_BIAS": needs[2],
                 "BLOCK_K": tr._slots_block(k), **settings}  # fmt: skip
    return compile_for_gpu(tr._router_grad_kernel, arch, pointers, constants, **launch)


def register_use(ptx: str, arch: int) -> dict:
    """ptxas's register and spill-store counts for a compiled kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        arch_flag = f"-arch=sm_{arch}{'a' if arch == 90 else ''}"
        ptxas = subprocess.run([get_ptxas(arch).path, arch_flag, "-v", source.name, "-o", "/dev/null"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    registers = re.search(r"Used (\d+) registers", ptxas.stderr)
    spills = re.search(r"(\d+) bytes spill stores", ptxas.stderr)
    return {"registers": int(registers.group(1)), "spill_bytes": int(spills.group(1)) if spills else 0}


# The routing kernel runs one small program per 16 samples: a few spilled words cost nothing measurable, and ptxas
# spills 4 to 76 bytes or none depending on the Triton version and tile for the same kernel. A bad tile choice spills
# kilobytes (4 warps over 1024 experts: 12 KB), which this catches.
MAX_ROUTE_SPILL_BYTES = 128


def check_route(arch: int, report: bool) -> None:
    """The routing kernel at the pool sizes of the speed targets (r in {12, 64, 256}, and 100 between), both modes,
    every dtype, gates none and softmax (k = 8); the router's gradient kernel at the same sizes, every dtype, all
    three gradients: at most a few spilled words, shared memory within the arch's limit."""
    for dtype, batch, gate, n_experts in itertools.product(DTYPES, (False, True), ("none", "softmax"),
                                                           (12, 64, 100, 256)):  # fmt: skip
        compiled = compile_route(arch, dtype, batch, True, True, n_experts, gate=tr.GATE_CODES[gate])
        what = f"sm_{arch} {dtype} routing ({'batch' if batch else 'sample'}, gate {gate}, r={n_experts})"
        _check_small_kernel(compiled, arch, what, report)
    for dtype, n_experts in itertools.product(DTYPES, (12, 64, 100, 256)):
        compiled = compile_route_grad(arch, dtype, 1, (True, True, True), n_experts)
        _check_small_kernel(compiled, arch, f"sm_{arch} {dtype} router gradient (softmax, r={n_experts})", report)


def _check_small_kernel(compiled, arch: int, what: str, report: bool) -> None:
    found = {**register_use(compiled.asm["ptx"], arch), "shared_bytes": compiled.metadata.shared}
    if report:
        print(what, found)
    assert found["spill_bytes"] <= MAX_ROUTE_SPILL_BYTES, f"{what}: registers spill: {found}"
    assert found["shared_bytes"] <= SHARED_LIMIT[arch], f"{what}: more shared memory than a block gets: {found}"


def fused_linear_resources(arch: int, dtype: str, shrink: bool, own_input: bool, span: bool, rows: int, n_out: int,
                           depth: int) -> dict:  # fmt: skip
    """The fused GEMM compiled as a launch on contiguous tensors specializes it; ptxas's register and spill counts,
    shared memory, and the count of tensor-core (wgmma / mma) and fp32 FMA instructions in the PTX."""
    tiles = tp.gemm_tiles(DTYPES[dtype], rows, n_out, depth)
    unit_strides = ("stride_x_col", "stride_w_in", "stride_shrink_in_col", "stride_proj_col", "stride_gate_slot",
                    "stride_expand_expert", "stride_idx_slot", "stride_y_col")  # fmt: skip
    divisible = ("x_ptr", "w_ptr", "bias_ptr", "u_ptr", "shrink_in_ptr", "proj_ptr", "gate_ptr", "expand_ptr",
                 "idx_ptr", "y_ptr", "stride_x_row", "stride_w_out", "stride_u_row", "stride_shrink_in_row",
                 "stride_proj_expert", "stride_expand_out", "stride_y_row", "depth", "n_out")  # fmt: skip
    flags = {**fused_linear_flags(shrink, own_input, dtype, tiles, 16, span, dense=not span),
             **dict.fromkeys(unit_strides, 1)}  # fmt: skip
    compiled = compile_for_gpu(tp._fused_linear_kernel, arch, fused_linear_pointers("*" + dtype), flags, divisible,
                               num_warps=tiles.num_warps, num_stages=tiles.num_stages)  # fmt: skip
    ptx = compiled.asm["ptx"]
    item = torch.finfo(DTYPES[dtype]).bits // 8
    return {
        "tiles": tiles,
        **register_use(ptx, arch),
        "shared_bytes": compiled.metadata.shared,
        "stage_bytes": (tiles.block_m + tiles.block_n) * tiles.block_k * item,
        "tensor_core_ops": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx)),
        "fp32_fmas": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
    }


# Shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB. Triton checks it only when a
# kernel loads on a device, so a too-deep pipeline would otherwise first fail on the GPU.
SHARED_LIMIT = {80: 166912, 90: 232448}


def check_fused_linear(arch: int, report: bool, shared_only: bool = False) -> None:
    """At ViT-B/16's q/k/v projection (32 x 197 tokens, 768 -> 768): the resource properties in the docstring, and
    shared memory within the arch's limit, for four forms of the kernel (mask variant, as for the paper's pool: the
    shrink separate, or in the K loop from x or from a separate LoRA input (dropout); gather variant: tiles across
    samples). shared_only: the shared-memory limit alone."""
    forms = {"mask, shrink separate": (False, False, False), "mask, shrink in the K loop": (True, False, False),
             "mask, shrink in the K loop from lora_input": (True, True, False),
             "gather, tiles span samples": (False, False, True)}  # fmt: skip
    for dtype, (form, (shrink, own_input, span)) in itertools.product(("bf16", "fp16"), forms.items()):
        found = fused_linear_resources(arch, dtype, shrink, own_input, span, 32 * 197, 768, 768)
        what = f"sm_{arch} {dtype} fused GEMM ({form})"
        if report:
            print(what, found)
        assert found["shared_bytes"] <= SHARED_LIMIT[arch], f"{what}: more shared memory than a block gets: {found}"
        if shared_only:
            continue
        assert found["spill_bytes"] == 0, f"{what}: registers spill: {found}"
        assert found["shared_bytes"] >= 2 * found["stage_bytes"], f"{what}: K loop not pipelined: {found}"
        assert found["tensor_core_ops"] > 0, f"{what}: no tensor-core instruction: {found}"
        assert found["fp32_fmas"] <= MAX_HALF_PRECISION_FMAS, f"{what}: tile products on CUDA cores: {found}"


if __name__ == "__main__":
    for arch in (80, 90):
        compile_all(arch)
    # Resources on the speed targets' GPUs (H100/H200). On sm_80 (mma.sync, more registers than wgmma) the 128 x 128
    # tiles spill 8 to ~340 bytes; A100 tuning is not a goal here, so sm_80 only has to compile and fit its shared
    # memory.
    check_fused_linear(90, report="--report" in sys.argv)
    check_fused_linear(80, report="--report" in sys.argv, shared_only=True)
    check_route(90, report="--report" in sys.argv)
    print("compiled")
