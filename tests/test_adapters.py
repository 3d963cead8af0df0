"""save_adapters / load_adapters: safetensors, atomic, everything needed to continue, no code execution."""

import json
import os
import pathlib

import pytest
import torch
import torch.nn as nn

from rank1_kernels import PoolLifecycle, inject, load_adapters, merge_all, pool_layers, save_adapters
from rank1_kernels.adapters import atomic_write


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(12, 20)
        self.mlp.c_proj = nn.Linear(20, 12)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp.c_proj(torch.relu(self.mlp.c_fc(x)))


def _base(seed=0):
    torch.manual_seed(seed)
    return TinyBlock()


def _train_a_little(model, steps=3):
    parameters = [p for _, layer in pool_layers(model) for p in (layer.lora_A, layer.lora_B, *layer.router.parameters())]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    model.train()
    for step in range(steps):
        x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_round_trip_restores_outputs_counts_routers_and_merges(tmp_path):
    model = inject(_base(), r=6, k=3, gate="softmax")
    _train_a_little(model)
    merge_all(model, top_m=2)
    _train_a_little(model)
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)

    restored = inject(_base(), r=6, k=3, gate="none")  # gate is taken from the file
    loaded = load_adapters(restored, path)
    assert sorted(loaded) == sorted(name for name, _ in pool_layers(model))
    for (name, original), (_, copy_) in zip(pool_layers(model), pool_layers(restored)):
        assert copy_.gate == "softmax", name
        for key in ("lora_A", "lora_B", "router.weight", "router.bias", "activation_counts", "merged_B", "merge_sizes"):
            assert torch.equal(original.state_dict()[key], copy_.state_dict()[key]), (name, key)
        torch.testing.assert_close(copy_.weight, original.weight, rtol=0, atol=1e-6)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=1e-5)


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    model = inject(_base(), r=4, k=2)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    layers = json.loads(metadata["layers"])
    assert set(layers) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"}
    assert "attn.q_proj.router.weight" in keys and "mlp.c_fc.activation_counts" in keys
    assert not any(key.endswith(".weight") and "router" not in key for key in keys)  # no base weights


def test_loading_refuses_mismatches(tmp_path):
    model = inject(_base(), r=4, k=2)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    with pytest.raises(ValueError, match=r"r=4 in the file but 6 in the model"):
        load_adapters(inject(_base(), r=6, k=2), path)
    with pytest.raises(ValueError, match=r"adapter file and model disagree"):
        load_adapters(inject(_base(), target=("mlp.c_fc",), r=4, k=2), path)
    merged = inject(_base(), r=4, k=2)
    merge_all(merged, top_m=1)
    with pytest.raises(ValueError, match=r"already has 1 merges"):
        load_adapters(merged, path)
    not_adapters = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(not_adapters))
    with pytest.raises(ValueError, match=r"is not a rank1_kernels adapter file"):
        load_adapters(model, not_adapters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loading_refuses_base_weights_that_hold_the_merges_already_and_changes_nothing(tmp_path, dtype):
    """The documented way to a plain model (merge_all + unload) saved, injected again and given the adapters would
    hold every merge twice: refused before any layer changes. The original base loads, in another dtype too."""
    model = inject(_base().to(dtype), r=4, k=2)
    with torch.no_grad():  # merges of a trained pool's size (training itself runs in fp32 elsewhere)
        for _, layer in pool_layers(model):
            layer.lora_B.normal_(std=0.5)
            layer.activation_counts.copy_(torch.randperm(4))
    merge_all(model, top_m=2)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    from rank1_kernels import unload

    plain = unload(model)
    reinjected = inject(plain, r=4, k=2)
    before = {name: layer.weight.detach().clone() for name, layer in pool_layers(reinjected)}
    with pytest.raises(ValueError, match=r"its base weight is not the one these adapters were saved from"):
        load_adapters(reinjected, path)
    assert all(torch.equal(layer.weight, before[name]) for name, layer in pool_layers(reinjected))
    assert not any(layer.merge_sizes.numel() for _, layer in pool_layers(reinjected))
    load_adapters(inject(_base().to(dtype), r=4, k=2), path)  # the original base weights
    load_adapters(inject(_base().to(torch.float64), r=4, k=2), path)  # the same, in another dtype
    load_adapters(reinjected, path, strict=False)  # the check is strict's


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")

    def failing_writer(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing_writer)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]
    atomic_write(path, lambda temporary: open(temporary, "wb").write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["state.bin"]


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "shared.bin", lambda temporary: pathlib.Path(temporary).write_bytes(b"x"))
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644


def test_lifecycle_runs_tasks_and_its_state_round_trips():
    model = inject(_base(), r=6, k=3)
    lifecycle = PoolLifecycle(model, top_m=2, ago_weight=0.1)
    lifecycle.begin_task("task-a")
    assert float(lifecycle.loss_extra()) == 0.0
    _train_a_little(model)
    with pytest.raises(RuntimeError, match="call end_task"):
        lifecycle.begin_task("task-b")
    lifecycle.end_task()
    lifecycle.begin_task("task-b")
    _train_a_little(model)
    extra = lifecycle.loss_extra()
    assert extra.requires_grad and float(extra.detach()) > 0
    state = lifecycle.state_dict()
    assert state["finished_tasks"] == ["task-a"] and state["current_task"] == "task-b"
    assert state["counts_per_task"]["mlp.c_fc"].shape == (1, 6)
    copy_ = PoolLifecycle(model)
    copy_.load_state_dict(state)
    assert copy_.state_dict()["finished_tasks"] == ["task-a"] and copy_.top_m == 2
    torch.testing.assert_close(copy_.loss_extra(), extra)


def test_lifecycle_state_with_a_different_top_m_per_task(tmp_path):
    """end_task(top_m=...) may merge a different number of experts each task; the state still saves (through
    torch.save, loaded with weights_only) and loads, and a state saved as stacked tensors still loads."""
    model = inject(_base(), r=6, k=3)
    lifecycle = PoolLifecycle(model, top_m=4)
    for task, top_m in (("a", None), ("b", 2)):
        lifecycle.begin_task(task)
        _train_a_little(model)
        lifecycle.end_task(top_m)
    path = tmp_path / "lifecycle.pt"
    torch.save(lifecycle.state_dict(), path)
    restored = PoolLifecycle(model)
    restored.load_state_dict(torch.load(path, weights_only=True))
    merged = restored.merged_experts_per_task["mlp.c_fc"]
    assert [len(experts) for experts in merged] == [4, 2]
    for ours, theirs in zip(merged, lifecycle.merged_experts_per_task["mlp.c_fc"]):
        assert torch.equal(ours, theirs)
    stacked = {**lifecycle.state_dict(), "merged_experts_per_task": {"mlp.c_fc": torch.stack([merged[0], merged[0]])}}
    restored.load_state_dict(stacked)
    assert [len(experts) for experts in restored.merged_experts_per_task["mlp.c_fc"]] == [4, 4]


def test_hooks_do_not_keep_a_model_alive():
    import gc
    import weakref

    from rank1_kernels.integrations import hooks

    model = inject(_base(), r=6, k=3)
    hooks.begin_task(model, 0)
    assert hooks.lifecycle_of(model) is hooks.lifecycle_of(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
