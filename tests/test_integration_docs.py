"""docs/INTEGRATING.md: every recipe is the code its example script runs (and the tests run the scripts): each
line of a recipe block appears, in order, in the file named on its first line."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = re.compile(r"```python\n# (examples/\S+\.py)\n(.*?)```", re.DOTALL)


def _recipes():
    return RECIPE.findall((ROOT / "docs" / "INTEGRATING.md").read_text())


def test_every_codebase_family_has_a_recipe():
    named = {path for path, _ in _recipes()}
    expected = {"zscl_style", "open_clip_training", "hf_trainer", "peft_bridge", "avalanche_plugin", "mammoth_model"}
    assert named == {f"examples/{name}.py" for name in expected}


def test_recipes_are_the_example_code_line_for_line():
    for path, block in _recipes():
        source_lines = [line.strip() for line in (ROOT / path).read_text().splitlines()]
        position = 0
        for line in (line.strip() for line in block.splitlines()):
            if not line:
                continue
            try:
                position = source_lines.index(line, position) + 1
            except ValueError:
                raise AssertionError(f"{path}: the documented line {line!r} is not in the script (in this order)")


README_REFERENCE = re.compile(r"## What a pool layer computes\n.*?```python\n(.*?)```", re.DOTALL)


def test_readme_reference_snippet_runs_and_is_what_the_layer_computes():
    """The README's "equivalent to" snippet, run as written on a layer's tensors, gives the layer's output."""
    import torch

    from rank1_kernels import FusedRank1PoolLinear

    (snippet,) = README_REFERENCE.findall((ROOT / "README.md").read_text())
    torch.manual_seed(0)
    n, T, d_in, d_out, r, k = 3, 5, 8, 6, 7, 3
    layer = FusedRank1PoolLinear(d_in, d_out, r=r, k=k, alpha=2.0, backend="reference")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(n * T, d_in)
    names = {"torch": torch, "x": x, "routing_tokens": x.view(n, T, d_in)[:, 0], "router": layer.router, "k": k,
             "n": n, "T": T, "d_in": d_in, "d_out": d_out, "A": layer.lora_A, "B": layer.lora_B, "W": layer.weight,
             "b": layer.bias, "alpha": layer.alpha, "r": r}  # fmt: skip
    with torch.no_grad():
        exec(snippet, names)  # noqa: S102 (the project's own README)
        expected = layer.eval()(x.view(n, T, d_in)).view(n * T, d_out)
    torch.testing.assert_close(names["y"], expected)
