"""Host-side arithmetic for kernel launches, in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton: called from host code each
goes through Triton's constexpr wrapper (about 5 us), and a layer's forward and backward compute dozens of grid and
tile sizes. These are the same functions without that wrapper.
"""

from __future__ import annotations


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for positive ints."""
    return -(-numerator // denominator)


def block(size: int, cap: int) -> int:
    """A power-of-two tile edge for a dimension of `size`: at least 16 (tl.dot's minimum), at most `cap`."""
    return max(16, min(cap, 1 << (max(size, 1) - 1).bit_length()))
