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
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "shared.bin", lambda temporary: pathlib.Path(temporary).write_bytes(b"x"))
        # safetensors makes its file anew, mode 0600, whatever file was there
        atomic_write(tmp_path / "tensors.safetensors", lambda temporary: save_file({"t": torch.zeros(2)}, temporary))
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "tensors.safetensors").stat().st_mode & 0o777 == 0o644


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
    stacked = {name: torch.stack([experts[0], experts[0]]) for name, experts in restored.merged_experts_per_task.items()}
    restored.load_state_dict({**lifecycle.state_dict(), "merged_experts_per_task": stacked})
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


def _two_pool_sizes():
    """c_fc with 8 experts, every other layer with 4: a top_m that suits one layer and not another."""
    model = inject(_base(), target=["mlp.c_fc"], r=8, k=2)
    return inject(model, target=["mlp.c_proj", "attn"], r=4, k=2)


def test_a_refused_end_task_merges_nothing_and_can_be_called_again():
    """top_m is checked against every layer before any merges: a failed end_task used to leave some layers merged
    and reset, and a retry recorded a second merge on top of theirs."""
    model = _two_pool_sizes()
    with pytest.raises(ValueError, match=r"top_m \(pool layer 'attn.q_proj'\)=6 is out of range.*r=4"):
        PoolLifecycle(model, top_m=6)  # before a task trains, not after
    lifecycle = PoolLifecycle(model, top_m=2)
    lifecycle.begin_task("a")
    _train_a_little(model)
    counts = {name: layer.activation_counts.clone() for name, layer in pool_layers(model)}
    with pytest.raises(ValueError, match="pool layer 'attn.q_proj'"):
        lifecycle.end_task(top_m=6)
    for name, layer in pool_layers(model):
        assert layer.merge_sizes.numel() == 0 and torch.equal(layer.activation_counts, counts[name]), name
    assert lifecycle.counts_per_task == {} and lifecycle.current_task == "a"
    lifecycle.end_task(top_m=3)
    assert {tuple(layer.merge_sizes.tolist()) for _, layer in pool_layers(model)} == {(3,)}
    assert all(len(history) == 1 for history in lifecycle.counts_per_task.values())
    with pytest.raises(ValueError, match="pool layer 'attn.q_proj'"):
        merge_all(model, top_m=5)
    assert {tuple(layer.merge_sizes.tolist()) for _, layer in pool_layers(model)} == {(3,)}


def test_hooks_refuse_to_change_settings_after_the_first_task():
    from rank1_kernels.integrations import hooks

    model = inject(_base(), r=6, k=3)
    hooks.begin_task(model, 0, top_m=2, ago_weight=0.1)
    hooks.end_task(model)
    with pytest.raises(ValueError, match=r"has top_m=2, ago_weight=0.1, fixed at its first begin_task; got top_m=5"):
        hooks.begin_task(model, 1, top_m=5, ago_weight=1.0)
    hooks.begin_task(model, 1, top_m=2, ago_weight=0.1)  # the same settings again: fine
    with pytest.raises(TypeError, match=r"unknown lifecycle setting\(s\) \['topm'\]"):
        hooks.lifecycle_of(model, topm=3)


def test_lifecycle_state_of_other_layers_is_refused():
    source = inject(_base(), r=6, k=3)
    lifecycle = PoolLifecycle(source, top_m=2)
    lifecycle.begin_task("a")
    _train_a_little(source)
    lifecycle.end_task()
    target = inject(_base(), target=["attn"], r=6, k=3)
    with pytest.raises(ValueError, match=r"entries for layers the model lacks: \['mlp.c_fc', 'mlp.c_proj'\]"):
        PoolLifecycle(target).load_state_dict(lifecycle.state_dict())


def test_mistakes_that_used_to_pass_silently():
    from rank1_kernels import FusedRank1PoolLinear, PoolConfig, mark_only_pool_trainable

    with pytest.raises(ValueError, match="no pool layers .*it would freeze everything"):
        mark_only_pool_trainable(_base())
    with pytest.raises(ValueError, match="unknown backend 'trition'; expected 'auto' or one of"):
        FusedRank1PoolLinear(4, 4, r=2, k=1, backend="trition")
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        inject(_base(), r=6, k=3, backend="trition")
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        PoolConfig(backend="trition")
    layer = FusedRank1PoolLinear(4, 4, r=2, k=1)
    for positions, token in (([0, 7], 7), ([-1, 0], -1)):
        layer.routing_positions = torch.tensor(positions)
        with pytest.raises(ValueError, match=f"routing_positions holds token {token}, outside the 3 tokens"):
            layer(torch.randn(2, 3, 4))
