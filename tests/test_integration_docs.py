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
