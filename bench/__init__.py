"""Benchmarks of rank1_kernels against the floor (nn.Linear) and the real alternatives (dense LoRA, peft, the
released code's materialised Delta W), the grouped AGO loss against a per-layer loop, and a whole CLIP training
step. Run from the repository root: `python -m bench sweep --preset cpu` (see bench/__main__.py, docs/bench.md).
"""
