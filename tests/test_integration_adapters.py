"""Trainer adapters driven by toy task streams: the function hooks, the Avalanche plugin (real Avalanche) and the
Mammoth-style model (against a stand-in of Mammoth's ContinualModel, as Mammoth is not installable). Each runs the
example script's code, so the documented recipe is what is tested."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from rank1_kernels import FusedRank1PoolLinear, PoolLifecycle, inject, pool_layers, unload
from rank1_kernels.integrations import hooks
from test_integration_families import _load_example


def _assert_merged_once_per_task(model, n_tasks, top_m):
    layers = [layer for _, layer in pool_layers(model)]
    assert layers
    for layer in layers:
        assert layer.merge_sizes.tolist() == [top_m] * n_tasks
        assert layer.merged_B.abs().sum() > 0, "a merge recorded zero B columns: the pools never trained"
        assert int(layer.activation_counts.sum()) == 0 and layer.lora_B.detach().abs().sum().item() == 0  # fresh pool


def test_function_hooks_keep_one_lifecycle_per_model_and_its_history():
    model = nn.Sequential()
    model.mlp = nn.Sequential()
    model.mlp.c_fc = nn.Linear(8, 8)
    inject(model, r=4, k=2)
    hooks.begin_task(model, "a", top_m=2, ago_weight=0.5)
    lifecycle = hooks.lifecycle_of(model)
    assert (
        isinstance(lifecycle, PoolLifecycle) and lifecycle.ago_weight == 0.5 and hooks.lifecycle_of(model) is lifecycle
    )
    assert hooks.loss_extra(model).item() == 0.0
    model(torch.randn(3, 5, 8))
    with torch.no_grad():
        model.mlp.c_fc.lora_B.normal_()
    merged = hooks.end_task(model)
    assert list(merged) == ["mlp.c_fc"] and merged["mlp.c_fc"].shape == (2,)
    hooks.begin_task(model, "b")
    model(torch.randn(3, 5, 8))
    with torch.no_grad():
        model.mlp.c_fc.lora_B.normal_()
    assert hooks.loss_extra(model).item() > 0
    state = hooks.state_dict(model)
    other = inject(nn.Sequential(nn.Linear(8, 8)), target="0", r=4, k=2)
    hooks.load_state_dict(other, {**state, "counts_per_task": {}, "merged_experts_per_task": {}})
    assert hooks.lifecycle_of(other).finished_tasks == ["a"] and hooks.lifecycle_of(other).current_task == "b"


def test_function_hooks_reach_one_lifecycle_through_wrappers_and_never_invent_one():
    """HF Trainer passes compute_loss the wrapped model (DataParallel, DDP, torch.compile) and its callbacks the
    bare one: both must reach the lifecycle begin_task made, not a second one with default settings."""
    model = nn.Sequential()
    model.mlp = nn.Sequential()
    model.mlp.c_fc = nn.Linear(8, 8)
    inject(model, r=4, k=2)
    with pytest.raises(RuntimeError, match=r"hooks.loss_extra\(model\) before hooks.begin_task"):
        hooks.loss_extra(model)
    hooks.begin_task(model, "a", top_m=2, ago_weight=0.5)
    for wrapper in (nn.DataParallel(model), torch.compile(model)):
        assert hooks.lifecycle_of(wrapper) is hooks.lifecycle_of(model)
    model(torch.randn(3, 5, 8))
    with torch.no_grad():
        model.mlp.c_fc.lora_B.normal_()
    hooks.end_task(nn.DataParallel(model))
    assert hooks.lifecycle_of(model).finished_tasks == ["a"]


def test_ago_term_follows_the_merges_the_model_holds_not_the_lifecycle_history():
    """A model restored from its state_dict (or an adapter file) under a fresh lifecycle has merges: its AGO term
    must be on from the first step, not silently zero until a task of this lifecycle ends."""
    def build():
        model = nn.Sequential()
        model.mlp = nn.Sequential()
        model.mlp.c_fc = nn.Linear(8, 8)
        return inject(model, r=4, k=2)

    torch.manual_seed(0)
    trained = build()
    lifecycle = PoolLifecycle(trained, top_m=2, ago_weight=0.5)
    lifecycle.begin_task(0)
    trained(torch.randn(3, 5, 8))
    with torch.no_grad():
        trained.mlp.c_fc.lora_B.normal_()
    lifecycle.end_task()
    restored = build()
    restored.load_state_dict(trained.state_dict())
    fresh = PoolLifecycle(restored, top_m=2, ago_weight=0.5)
    fresh.begin_task(1)
    restored(torch.randn(3, 5, 8))
    with torch.no_grad():
        restored.mlp.c_fc.lora_B.normal_()
    assert fresh.finished_tasks == [] and fresh.loss_extra().item() > 0


def _merge_worker(rank, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same model on both ranks
    model = inject(nn.Sequential(nn.Linear(8, 8)), target="0", r=6, k=2)
    lifecycle = PoolLifecycle(model, top_m=2)
    torch.manual_seed(rank)  # each rank's generator draws other fresh pools
    lifecycle.begin_task(0)
    torch.save(model[0].lora_A.detach().clone(), f"{path}.A{rank}")
    counts = [9, 8, 0, 0, 0, 0] if rank == 0 else [0, 0, 0, 0, 8, 9]  # each rank counted its own slice of the data
    with torch.no_grad():
        model[0].activation_counts.copy_(torch.tensor(counts))
    merged = lifecycle.end_task()["0"]
    torch.save(merged, f"{path}.{rank}")
    dist.destroy_process_group()


def test_end_task_under_torch_distributed_merges_the_same_experts_on_every_rank(tmp_path):
    """Replicas that started from different fresh pools, or merged different experts, would drift apart silently:
    every rank gets rank 0's fresh pools and merges rank 0's choice."""
    import socket

    import torch.multiprocessing as multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = str(tmp_path / "merged")
    multiprocessing.spawn(_merge_worker, args=(port, path), nprocs=2, join=True)
    merged = [torch.load(f"{path}.{rank}", weights_only=True) for rank in (0, 1)]
    assert sorted(merged[0].tolist()) == sorted(merged[1].tolist()) == [0, 1]
    fresh = [torch.load(f"{path}.A{rank}", weights_only=True) for rank in (0, 1)]
    assert torch.equal(fresh[0], fresh[1])  # one fresh pool: rank 0's


def test_open_clip_script_recipe_saves_and_resumes_the_continual_history(tmp_path):
    pytest.importorskip("open_clip")
    example = _load_example("open_clip_training")
    path = str(tmp_path / "checkpoint.pt")
    result = example.run(path, n_tasks=2, steps_per_task=2)
    _assert_merged_once_per_task(result["model"], n_tasks=2, top_m=4)
    resumed = example.resume(path)
    lifecycle = hooks.lifecycle_of(resumed)
    assert lifecycle.finished_tasks == [0, 1] and lifecycle.current_task is None
    for (name, layer), (_, original) in zip(pool_layers(resumed), pool_layers(result["model"])):
        torch.testing.assert_close(layer.weight, original.weight, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(layer.merged_B, original.merged_B, rtol=0, atol=0, msg=name)
    first_text_layer = next(layer for name, layer in pool_layers(resumed) if not name.startswith("visual."))
    resumed.encode_text(torch.tensor([[98, 5, 99] + [0] * 9]))
    assert first_text_layer.routing_positions.tolist() == [2]


def test_zscl_style_recipe_gives_a_plain_checkpoint(tmp_path):
    example = _load_example("zscl_style")
    layout = _load_example("openai_clip_layout")
    path = str(tmp_path / "clip.pt")
    result = example.run(path, n_tasks=2, steps_per_task=2)
    assert [ago for task, _, ago in result["losses"] if task == 0] == [0.0] * 4
    assert any(ago > 0 for task, _, ago in result["losses"] if task == 1)
    assert not any(isinstance(m, FusedRank1PoolLinear) for m in result["model"].modules())
    fresh = layout.CLIP()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert all(type(block.attn) is nn.MultiheadAttention for block in fresh.transformer.resblocks)
    assert len(result["history"]["merged_experts_per_task"]) == 24


def test_hf_trainer_recipe_runs_a_task_per_train_call(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = _load_example("hf_trainer")
    result = example.run(str(tmp_path), n_tasks=2, steps_per_task=2)
    assert result["lifecycle"].finished_tasks == [0, 1]
    merged = result["lifecycle"].merged_experts_per_task
    assert len(merged) == 24 and all([e.shape for e in v] == [(4,), (4,)] for v in merged.values())
    from transformers import CLIPModel

    reloaded = CLIPModel.from_pretrained(str(tmp_path / "clip_after_all_tasks"))
    state = result["model"].state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_peft_recipe_runs_the_lifecycle_and_unloads():
    pytest.importorskip("peft")
    example = _load_example("peft_bridge")
    result = example.run(n_tasks=2, steps_per_task=2)
    assert result["lifecycle"].finished_tasks == [0, 1]
    assert type(result["model"]).__name__ == "CLIPModel"
    assert not any(isinstance(m, FusedRank1PoolLinear) for m in result["model"].modules())


class _AgoTermSpy:
    """An Avalanche plugin placed after the pool plugin: at before_backward, the AGO term it added is strategy.loss
    minus the criterion on the same minibatch."""

    def __init__(self) -> None:
        self.terms: list[tuple[int, float]] = []
        self.pool_state_at_start: list[int] = []  # optimizer entries of pool parameters when an experience starts

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_epochs == 0:
            pool = {id(p) for _, layer in pool_layers(strategy.model) for p in (layer.lora_A, layer.lora_B)}
            self.pool_state_at_start.append(sum(id(p) in pool for p in strategy.optimizer.state))

    def before_backward(self, strategy, **kwargs) -> None:
        task_loss = strategy.criterion()
        self.terms.append((strategy.experience.current_experience, (strategy.loss - task_loss).item()))


def test_avalanche_plugin_drives_the_lifecycle_over_a_stream():
    pytest.importorskip("avalanche")
    pytest.importorskip("timm")
    example = _load_example("avalanche_plugin")
    spy = _AgoTermSpy()
    result = example.run(n_experiences=2, other_plugins=[spy])
    plugin = result["plugin"]
    assert plugin.lifecycle.finished_tasks == [0, 1] and plugin.lifecycle.current_task is None
    _assert_merged_once_per_task(result["model"], n_tasks=2, top_m=2)
    assert {exp for exp, _ in spy.terms} == {0, 1}
    assert all(term == 0.0 for exp, term in spy.terms if exp == 0)  # no AGO on the first experience
    assert any(term > 0 for exp, term in spy.terms if exp == 1)

    # Each experience's fresh pool starts without the merged pool's optimizer moments (Avalanche keeps the
    # optimizer's state across experiences).
    assert spy.pool_state_at_start == [0, 0]

    restored = example.Rank1PoolPlugin()
    restored.load_state_dict(result["checkpoint"]["pool_lifecycle"])
    assert restored.state_dict()["finished_tasks"] == [0, 1]
    restored._lifecycle_for(result["model"])
    assert restored.lifecycle.finished_tasks == [0, 1]

    unload(result["model"])
    assert type(result["model"].blocks[0].attn.qkv) is nn.Linear


def test_mammoth_style_model_runs_through_the_stand_in_continual_model_hooks():
    pytest.importorskip("timm")
    example = _load_example("mammoth_model")
    result = example.run(n_tasks=2, epochs=2)
    model = result["model"]
    assert model.current_task == 2 and model.pool_lifecycle.finished_tasks == [0, 1]
    _assert_merged_once_per_task(model.net, n_tasks=2, top_m=2)
    trainable = {id(p) for p in model.get_parameters()}
    optimized = {id(p) for group in model.opt.param_groups for p in group["params"]}
    assert trainable == optimized and all(p.requires_grad for p in model.get_parameters())
    assert all(isinstance(loss, float) and math.isfinite(loss) for _, loss in result["losses"])
    state = model.pool_state_dict()
    assert state["finished_tasks"] == [0, 1]
    args = example.Rank1Pool.get_parser().parse_args(
        ["--pool_target", "mlp.fc1,mlp.fc2", "--pool_r", "4", "--pool_k", "2"]
    )
    only_mlp = example.Rank1Pool(
        example.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4),
        nn.CrossEntropyLoss(),
        args,
        None,
    )
    assert sorted(name for name, _ in pool_layers(only_mlp.net)) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


class _MammothStyleViT(nn.Module):
    """Shaped like Mammoth's backbone/vit.py (timm's layout, its own classes): blocks[i].attn.qkv / .proj,
    blocks[i].mlp.fc1 / .fc2, a classifier head."""

    def __init__(self, dim=16, classes=4):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attn, block.mlp = nn.Module(), nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            self.blocks.append(block)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (batch, tokens, 12)
        x = self.embed(x)
        for block in self.blocks:
            q, k, v = block.attn.qkv(x).chunk(3, dim=-1)
            x = x + block.attn.proj(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)
            x = x + block.mlp.fc2(torch.relu(block.mlp.fc1(x)))
        return self.head(x[:, 0])


def test_mammoth_defaults_fit_a_timm_shaped_vit_of_another_class_and_train_its_head():
    pytest.importorskip("timm")
    example = _load_example("mammoth_model")
    args = example.Rank1Pool.get_parser().parse_args(["--pool_r", "4", "--pool_k", "2"])
    model = example.Rank1Pool(_MammothStyleViT(), nn.CrossEntropyLoss(), args, None)
    assert sorted(name for name, _ in pool_layers(model.net)) == sorted(
        f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    optimized = {id(p) for group in model.opt.param_groups for p in group["params"]}
    assert {id(model.net.head.weight), id(model.net.head.bias)} <= optimized  # class-IL learns its head
    assert id(model.net.embed.weight) not in optimized
    pools_only = example.Rank1Pool(
        _MammothStyleViT(), nn.CrossEntropyLoss(), example.Rank1Pool.get_parser().parse_args(
            ["--pool_r", "4", "--pool_k", "2", "--pool_train_modules", ""]), None)  # fmt: skip
    assert not pools_only.net.head.weight.requires_grad
    model.meta_begin_task(None)
    loss = model.meta_observe(torch.randn(3, 5, 12), torch.tensor([0, 1, 2]), None)
    assert math.isfinite(loss)


def test_import_rank1_kernels_needs_none_of_the_integrated_libraries():
    code = (
        "import sys\n"
        "import rank1_kernels, rank1_kernels.integrations\n"
        "import rank1_kernels.integrations.hooks, rank1_kernels.integrations.mammoth\n"
        "bad = [m for m in ('avalanche', 'peft', 'transformers', 'timm', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
