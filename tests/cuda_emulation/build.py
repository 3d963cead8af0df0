"""Build csrc/ for host emulation and load it: the real kernels and bindings, run on CPU tensors.

The .cu files are compiled as C++ after one syntactic rewrite that C++ cannot express otherwise:
    kernel<T><<<grid, block, shared, stream>>>(args);  ->  ::rank1_emu::launch(grid, block, shared, stream, [&] { kernel<T>(args); });
    extern __shared__ unsigned char name[];            ->  unsigned char* name = ::rank1_emu::dynamic_shared();
Everything else (kernel bodies, launchers, bindings.cpp) is compiled as written, with include/ standing in for the
CUDA headers and RANK1_CUDA_EMULATION switching bindings.cpp's device plumbing to CPU. The ops are registered as
rank1::cuda_* for the CPU dispatch key, so load this in a process of its own (kernel_checks.py is run that way).
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
INCLUDE = HERE / "include"

_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def _matching_paren(text: str, open_at: int) -> int:
    depth = 0
    for position in range(open_at, len(text)):
        if text[position] == "(":
            depth += 1
        elif text[position] == ")":
            depth -= 1
            if depth == 0:
                return position
    raise ValueError(f"unbalanced parentheses after offset {open_at}")


def rewrite_launches(source: str) -> str:
    """The CUDA source with every <<<...>>> launch and extern __shared__ declaration in emulator form."""
    source = _DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::rank1_emu::dynamic_shared());", source)
    out, cursor = [], 0
    while (start := source.find("<<<", cursor)) != -1:
        config_end = source.index(">>>", start)
        # The kernel's name (with template arguments) is the expression right before <<<.
        name_match = re.search(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*$", source[cursor:start])
        if name_match is None:
            raise ValueError(f"cannot find the kernel name before the launch at offset {start}")
        name_start = cursor + name_match.start(1)
        args_open = source.index("(", config_end)
        args_close = _matching_paren(source, args_open)
        config = source[start + 3 : config_end].strip()
        if config.count(",") == 1:
            config += ", 0, nullptr"  # <<<grid, block>>>
        elif config.count(",") == 2:
            config += ", nullptr"  # <<<grid, block, shared>>>
        kernel = source[name_start:start].strip()
        out.append(source[cursor:name_start])
        out.append(f"::rank1_emu::launch({config}, [&] {{ {kernel}{source[args_open : args_close + 1]}; }})")
        cursor = args_close + 1
    out.append(source[cursor:])
    rewritten = "".join(out)
    if "<<<" in rewritten or "extern __shared__" in rewritten:
        raise ValueError("a launch or dynamic shared declaration was left unrewritten")
    return rewritten


def load(build_dir: Path, verbose: bool = False, sanitize: bool = False) -> None:
    """Compile csrc/ for emulation into build_dir and load it: defines rank1::cuda_* for CPU tensors."""
    from torch.utils.cpp_extension import load as load_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu_file in sorted(CSRC.glob("*.cu")):
        target = build_dir / f"{cu_file.stem}_emulated.cpp"
        target.write_text(f'#line 1 "{cu_file}"\n' + rewrite_launches(cu_file.read_text()))
        sources.append(str(target))
    sources.append(str(CSRC / "bindings.cpp"))
    sources.append(str(HERE / "conversion_ops.cpp"))  # rank1_emu::*: the emulator's own conversions, for checking
    flags = ["-O1", "-g", "-DRANK1_CUDA_EMULATION", "-pthread"]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    load_extension(
        name="rank1_kernels_cuda_emulated",
        sources=sources,
        extra_include_paths=[str(INCLUDE), str(CSRC)],
        extra_cflags=flags,
        extra_ldflags=["-pthread"] + (["-fsanitize=address,undefined"] if sanitize else []),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
