"""Named sweeps. `gpu` is the full grid of the issue; `cpu` a small one that runs in minutes on two cores;
`tiny` a seconds-long one for the tests.

Layer shapes are the real ones (tokens = batch x tokens per sample):
    ViT-B/16 vision tower: 32 x 197 tokens, width 768: q/k/v/out 768->768, fused qkv 768->2304,
                           mlp.c_fc 768->3072, mlp.c_proj 3072->768
    ViT-L/14 vision tower: 32 x 257 tokens, width 1024: 1024->1024, 1024->3072, 1024->4096, 4096->1024
    a 4096-wide LLM layer: 4 x 1024 tokens, 4096->4096 (attention) and 4096->11008 (MLP up, LLaMA-7B)
"""

from __future__ import annotations

import dataclasses

from .ago_bench import AgoSweep
from .layer import LINEAR, OFFICIAL, PEFT, LayerShape, LayerSweep
from .step import StepConfig
from .timing import TimingConfig


@dataclasses.dataclass
class Preset:
    name: str
    description: str
    timing: TimingConfig
    layer_sweeps: list[LayerSweep]
    ago: AgoSweep | None
    step: StepConfig | None
    # torch CPU threads unless --threads says otherwise (None: torch's default). One thread on CPU: a shared
    # CI machine deschedules one of two busy threads often, which makes multi-threaded medians jump.
    cpu_threads: int | None = None
    # Also time each Triton pool-linear variant pinned (bench.variants), to check the dispatcher's choice.
    triton_variants: bool = False

    def parts(self) -> list[str]:
        """The names --only selects from: each layer sweep's group, 'ago' and 'step'."""
        return (
            [sweep.group for sweep in self.layer_sweeps]
            + (["ago"] if self.ago else [])
            + (["step"] if self.step else [])
        )


def vit_b16(n_samples: int = 32) -> list[LayerShape]:
    return [
        LayerShape("vit-b16", "attn.q", n_samples, 197, 768, 768),
        LayerShape("vit-b16", "attn.qkv", n_samples, 197, 768, 2304),
        LayerShape("vit-b16", "mlp.c_fc", n_samples, 197, 768, 3072),
        LayerShape("vit-b16", "mlp.c_proj", n_samples, 197, 3072, 768),
    ]


def vit_l14(n_samples: int = 32) -> list[LayerShape]:
    return [
        LayerShape("vit-l14", "attn.q", n_samples, 257, 1024, 1024),
        LayerShape("vit-l14", "attn.qkv", n_samples, 257, 1024, 3072),
        LayerShape("vit-l14", "mlp.c_fc", n_samples, 257, 1024, 4096),
        LayerShape("vit-l14", "mlp.c_proj", n_samples, 257, 4096, 1024),
    ]


def llm_4096() -> list[LayerShape]:
    return [
        LayerShape("llm-4096", "attn.q", 4, 1024, 4096, 4096),
        LayerShape("llm-4096", "mlp.up", 4, 1024, 4096, 11008),
    ]


# The grid of issue #3's speed targets (bench.report.TARGETS judges them): ViT-B/16 layers in bf16, r in {12, 64,
# 256}, k in {4, 8}, batch routing, against nn.Linear, peft's LoRA and the official way; only the shipped backends.
TARGET_RANKS, TARGET_TOP_KS = [12, 64, 256], [4, 8]


def _gpu() -> Preset:
    q_proj, _, c_fc, _ = vit_b16()
    grid = dict(ranks=[12, 64, 256], top_ks=[4, 8, 16], dtypes=["bf16"], routings=["batch", "sample"], cuda_graphs=True)
    return Preset(
        name="gpu",
        description="the full grid on one GPU: issue #3's target grid first (ViT-B/16, bf16, shipped backends), then "
        "each model's layers in bf16 over r x k with CUDA graphs, LoRA dropout 0.2, fp16/fp32 on ViT-B/16, a token "
        "sweep, AGO over 144 layers, a ViT-B/16 training step at batch 32",
        timing=TimingConfig(
            warmup=5, min_samples=10, max_samples=50, target_seconds=0.05, warmup_seconds=0.025, graph_iterations=8
        ),
        layer_sweeps=[
            LayerSweep(
                "targets", vit_b16(), TARGET_RANKS, TARGET_TOP_KS, ["bf16"], methods=[LINEAR, PEFT, OFFICIAL, "pool"],
                cuda_graphs=True, backends=["triton", "cuda"], rank_major=True,
            ),  # fmt: skip
            LayerSweep("vit-b16", vit_b16(), **grid),
            LayerSweep("vit-l14", vit_l14(), **grid),
            LayerSweep("llm-4096", llm_4096(), **grid),
            LayerSweep(
                "dtypes", vit_b16(), [12], [8], ["fp16", "fp32"], routings=["batch", "sample"], cuda_graphs=True
            ),
            LayerSweep("dropout", [q_proj, c_fc], [12], [8], ["bf16"], cuda_graphs=True, dropout=0.2),
            LayerSweep(
                "tokens",
                [dataclasses.replace(q_proj, n_samples=n) for n in (1, 2, 4, 8, 16, 32, 64, 128)],
                [12],
                [8],
                ["bf16"],
                routings=["batch", "sample"],
            ),
        ],
        # The target's case first (bf16, the end of an 11-task sequence): one GPU session may time only a group or two.
        ago=AgoSweep(previous_tasks=[10, 5, 1], dtypes=["bf16", "fp32"], cuda_graphs=True),
        step=StepConfig(
            model="ViT-B-16", batch_size=32, dtypes=["bf16"], warmup_steps=5, timed_steps=20, cuda_graphs=True
        ),
        triton_variants=True,
    )


def _cpu() -> Preset:
    q_proj, _, c_fc, _ = vit_b16(n_samples=2)
    return Preset(
        name="cpu",
        description="a small grid for a CPU in a few minutes: ViT-B/16 layers at 2 x 197 tokens in fp32 (and bf16 "
        "for one shape), r in {12, 64}, k in {4, 8}; a token sweep; AGO over 144 layers; a 2-block CLIP step",
        timing=TimingConfig(warmup=2, min_samples=5, max_samples=50, target_seconds=0.25),
        layer_sweeps=[
            LayerSweep("vit-b16", [q_proj, c_fc], [12, 64], [4, 8], ["fp32"]),
            LayerSweep("bf16", [q_proj], [12], [8], ["bf16"]),
            LayerSweep("tokens", [dataclasses.replace(q_proj, n_samples=n) for n in (1, 2, 4, 8)], [12], [8], ["fp32"]),
        ],
        ago=AgoSweep(previous_tasks=[1, 10], dtypes=["fp32"]),
        step=StepConfig(
            model="ViT-B-16",
            vision_overrides={"layers": 2, "image_size": 64},
            text_overrides={"layers": 2},
            batch_size=4,
            dtypes=["fp32"],
            warmup_steps=2,
            timed_steps=5,
        ),
        cpu_threads=1,
    )


def _tiny() -> Preset:
    shape = LayerShape("tiny", "proj", 2, 5, 16, 24)
    return Preset(
        name="tiny",
        description="seconds-long smoke run for the tests: one 16->24 layer, a 2-layer AGO, a 1-block CLIP step",
        timing=TimingConfig(warmup=1, min_samples=3, max_samples=5, target_seconds=0.01),
        layer_sweeps=[
            LayerSweep("main", [shape], [4, 8], [2], ["fp32"]),
            LayerSweep(
                "tokens",
                [dataclasses.replace(shape, n_samples=n) for n in (1, 2)],
                [4],
                [2],
                ["fp32"],
                directions=["forward+backward"],
            ),
        ],
        ago=AgoSweep(widths=[16], blocks=1, r=4, top_m=2, previous_tasks=[2]),
        step=StepConfig(
            model="ViT-B-16",
            vision_overrides={"layers": 1, "width": 64, "image_size": 32, "patch_size": 16},
            text_overrides={"layers": 1, "width": 32, "heads": 2, "context_length": 8, "vocab_size": 100},
            embed_dim=16,
            batch_size=2,
            r=4,
            k=2,
            warmup_steps=1,
            timed_steps=2,
        ),
    )


PRESETS = {"gpu": _gpu, "cpu": _cpu, "tiny": _tiny}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()
