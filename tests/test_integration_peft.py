"""The peft bridge: the pool layer through get_peft_model (LoraConfig with a custom module mapping) computes what
inject() computes, trains only the pool, runs the continual life cycle, merge_and_unload gives the weights of
merge_all + unload, and save_pretrained + loading onto the original base model restores the model bit for bit."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils import load_peft_weights, set_peft_model_state_dict  # noqa: E402

from rank1_kernels import PoolLifecycle, inject, merge_all, pool_layers, unload  # noqa: E402
from rank1_kernels.families import set_text_routing  # noqa: E402
from rank1_kernels.integrations.peft_bridge import (  # noqa: E402
    POOL_SETTINGS_FILE,
    Rank1PoolLoraLinear,
    load_rank1_pool_adapter,
    rank1_pool_lora_config,
    save_rank1_pool_adapter,
)
from _tolerance import assert_close_by_rule  # noqa: E402
from test_integration_families import _captions, _hf_clip, _images, _train_pools_at_random  # noqa: E402

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _features(model):
    out = model(input_ids=_captions(eos=97), pixel_values=_images())
    return torch.cat([out.image_embeds, out.text_embeds])


def _both(r=4, k=2, top_m=2, text_routing="first"):
    """The same tiny CLIP with pools through our inject() and through peft, the pools' tensors made equal."""
    original = _hf_clip().eval()
    ours = inject(copy.deepcopy(original), target=HF_TARGETS, r=r, k=k, text_routing=text_routing).eval()
    _train_pools_at_random(ours)
    config = rank1_pool_lora_config(target_modules=HF_TARGETS, r=r, lora_alpha=1.0, k=k, top_m=top_m)
    theirs = get_peft_model(copy.deepcopy(original), config).eval()
    set_text_routing(theirs, text_routing)
    our_layers = dict(pool_layers(ours))
    their_layers = dict(pool_layers(theirs))
    assert len(their_layers) == len(our_layers) == 24
    for name, layer in their_layers.items():
        source = our_layers[name.removeprefix("base_model.model.").removesuffix(".lora_pool.default")]
        with torch.no_grad():
            for tensor_name in ("lora_A", "lora_B", "activation_counts"):
                getattr(layer, tensor_name).copy_(getattr(source, tensor_name))
            layer.router.load_state_dict(source.router.state_dict())
    return original, ours, theirs


@pytest.mark.parametrize("text_routing", ["first", "eot"])
def test_peft_model_computes_what_the_injected_model_computes_and_trains_only_the_pool(text_routing):
    _, ours, theirs = _both(text_routing=text_routing)
    with torch.no_grad():
        torch.testing.assert_close(_features(theirs), _features(ours), rtol=0, atol=0)
    assert any(isinstance(m, Rank1PoolLoraLinear) for m in theirs.modules())
    trainable = [name for name, p in theirs.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_pool.default." in name for name in trainable)
    assert not any(
        name.endswith(("lora_pool.default.weight", "lora_pool.default.bias")) for name in theirs.state_dict()
    )
    theirs.base_model.set_adapter("default")  # peft sets requires_grad on whole adapter modules
    assert not any(p.requires_grad for name, p in theirs.named_parameters() if "base_layer" in name)


def test_merge_and_unload_gives_the_weights_of_our_merge():
    original, ours, theirs = _both()
    merge_all(ours, top_m=2)
    unload(ours)
    merged = theirs.merge_and_unload()
    assert type(merged) is type(original)
    assert not any(isinstance(m, Rank1PoolLoraLinear) for m in merged.modules())
    ours_state, theirs_state = ours.state_dict(), merged.state_dict()
    assert ours_state.keys() == theirs_state.keys() == original.state_dict().keys()
    for key in ours_state:
        torch.testing.assert_close(theirs_state[key], ours_state[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(
        theirs_state["text_model.encoder.layers.0.mlp.fc1.weight"],
        original.state_dict()["text_model.encoder.layers.0.mlp.fc1.weight"],
    )


def test_merge_then_unmerge_restores_the_base_weights():
    _, _, theirs = _both()
    layer = next(m for m in theirs.modules() if isinstance(m, Rank1PoolLoraLinear))
    before = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before + delta, rtol=1e-6, atol=1e-7)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=1e-6, atol=1e-7)


def test_lifecycle_runs_on_the_peft_model():
    _, _, theirs = _both()
    lifecycle = PoolLifecycle(theirs, top_m=2, ago_weight=0.1)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for task in range(2):
        lifecycle.begin_task(task)
        for _ in range(2):
            loss = _features(theirs).square().mean() + lifecycle.loss_extra()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if task == 1:
            assert lifecycle.loss_extra().item() > 0
        lifecycle.end_task()
    layer = next(layer for _, layer in pool_layers(theirs))
    assert layer.merge_sizes.tolist() == [2, 2]
    base = next(m for m in theirs.modules() if isinstance(m, Rank1PoolLoraLinear)).base_layer
    assert base.weight is layer.weight and not base.weight.requires_grad


def test_the_bridge_refuses_a_second_adapter():
    _, _, theirs = _both()
    layer = next(m for m in theirs.modules() if isinstance(m, Rank1PoolLoraLinear))
    with pytest.raises(ValueError, match="holds one adapter"):
        layer.update_layer("second", 4, 1.0, 0.0, 2, "sample", "none", "auto", True)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        Rank1PoolLoraLinear(nn.Conv1d(2, 2, 1), "default")


def _bf16_net():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.mlp = nn.Sequential()
    model.mlp.c_fc = nn.Linear(16, 16)
    return model.to(torch.bfloat16)


def test_a_half_precision_model_needs_peft_to_keep_its_dtype_and_says_so(tmp_path):
    """peft's default autocast_adapter_dtype=True recreates a bf16 adapter's parameters in fp32, the shared base
    weight too: the pool then no longer writes its merges into the base layer. That is refused with the fix named;
    with autocast_adapter_dtype=False the pool shares the weight, merges into it, and the saved adapter loads back
    (load_rank1_pool_adapter keeps the dtype itself)."""
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    config = dict(target_modules=["c_fc"], r=4, k=2, top_m=2)
    cast = get_peft_model(_bf16_net(), rank1_pool_lora_config(**config))
    with pytest.raises(RuntimeError, match="autocast_adapter_dtype=False"):
        cast(x)
    kept = get_peft_model(_bf16_net(), rank1_pool_lora_config(**config), autocast_adapter_dtype=False)
    layer = next(m for m in kept.modules() if isinstance(m, Rank1PoolLoraLinear))
    assert layer.lora_pool["default"].weight is layer.base_layer.weight
    kept(x)
    with torch.no_grad():
        layer.lora_pool["default"].lora_B.normal_()
    before = layer.base_layer.weight.detach().clone()
    lifecycle = PoolLifecycle(kept, top_m=2)
    lifecycle.begin_task(0)
    kept(x)
    with torch.no_grad():
        layer.lora_pool["default"].lora_B.normal_()
    lifecycle.end_task()
    assert not torch.equal(layer.base_layer.weight, before)  # the merge reached the base layer
    save_rank1_pool_adapter(kept, tmp_path)
    loaded = load_rank1_pool_adapter(_bf16_net(), tmp_path)
    loaded_layer = next(m for m in loaded.modules() if isinstance(m, Rank1PoolLoraLinear))
    assert torch.equal(loaded_layer.base_layer.weight, layer.base_layer.weight)
    assert loaded(x).dtype == torch.bfloat16


def test_lora_options_the_pool_cannot_honour_and_non_linear_targets_are_refused():
    with pytest.raises(ValueError, match=r"\{'use_rslora': True\} have no meaning"):
        rank1_pool_lora_config(target_modules=["c_fc"], r=4, k=2, use_rslora=True)
    model = nn.Sequential()
    model.embed = nn.Embedding(10, 16)
    model.c_fc = nn.Linear(16, 16)
    with pytest.raises(TypeError, match="targets nn.Linear layers only; Embedding matched"):
        get_peft_model(model, rank1_pool_lora_config(target_modules=["embed", "c_fc"], r=4, k=2))
    attention = nn.Sequential()
    attention.attn = nn.MultiheadAttention(16, 2)
    with pytest.raises(TypeError, match="targets nn.Linear layers only; MultiheadAttention matched"):
        get_peft_model(attention, rank1_pool_lora_config(target_modules=["attn"], r=4, k=2))


# ---- save_pretrained and loading back ---------------------------------------------------------------------------

POOL = dict(r=4, lora_alpha=2.0, k=2, top_m=2)  # lora_alpha != 1: the scaling, 0.5, must survive the round trip
POOL_BUFFERS = ("activation_counts", "merged_A", "merged_B", "merged_scaling", "merge_sizes")


def _train_pools_by_forward(model, seed):
    """Stand-in for a task of training: random B columns, and activation counts from train-mode forward passes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pool_layers(model):
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
        model.train()
        for _ in range(2):
            _features(model)
    model.eval()


def _trained_peft_model():
    """A peft model after two merged tasks and halfway through a third: a merge history, a live pool, counts."""
    model = get_peft_model(_hf_clip(), rank1_pool_lora_config(target_modules=HF_TARGETS, **POOL))
    set_text_routing(model, "eot")
    lifecycle = PoolLifecycle(model, top_m=POOL["top_m"])
    for task in range(3):
        lifecycle.begin_task(task)
        _train_pools_by_forward(model, seed=task)
        if task < 2:
            lifecycle.end_task()
    return model


def _refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading the adapter unpickled something: it could run code from the file")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)


def _assert_same_state(actual, expected):
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        torch.testing.assert_close(actual_state[key], value, rtol=0, atol=0, msg=key)


LOADERS = {
    "load_rank1_pool_adapter": lambda base, path: load_rank1_pool_adapter(
        base, path, k=POOL["k"], top_m=POOL["top_m"], is_trainable=True
    ),
    "from_pretrained_with_config": lambda base, path: PeftModel.from_pretrained(
        base, path, config=rank1_pool_lora_config(target_modules=HF_TARGETS, **POOL)
    ),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_save_pretrained_round_trip_restores_pools_merges_and_outputs_bit_for_bit(tmp_path, monkeypatch, loader):
    trained = _trained_peft_model()
    with torch.no_grad():
        expected = _features(trained)
    trained.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("adapter_model*")) == ["adapter_model.safetensors"]

    base = _hf_clip()  # the original base weights: the adapter's merges go back into them
    pristine_fc1 = base.text_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
    _refuse_unpickling(monkeypatch)
    loaded = LOADERS[loader](base, tmp_path)
    monkeypatch.undo()
    set_text_routing(loaded, "eot")  # routing hooks are not part of the adapter
    loaded.eval()

    layers = dict(pool_layers(loaded))
    assert layers.keys() == dict(pool_layers(trained)).keys() and len(layers) == 24
    for name, layer in layers.items():
        assert layer.scaling == 0.5 and layer.merged_scaling.tolist() == [0.5] * 4, name
        assert layer.merge_sizes.tolist() == [2, 2] and int(layer.activation_counts.sum()) > 0, name
        assert layer.lora_B.detach().abs().sum() > 0 and layer.merged_B.abs().sum() > 0, name
    # Every parameter and buffer: pools, routers, counts, merge history, and the base weights with the merges in.
    _assert_same_state(loaded, trained)
    assert {key.rsplit(".", 1)[-1] for key in loaded.state_dict() if ".lora_pool." in key} >= set(POOL_BUFFERS)
    fc1 = loaded.base_model.model.text_model.encoder.layers[0].mlp.fc1.base_layer.weight
    assert not torch.equal(fc1, pristine_fc1) and not fc1.requires_grad
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert all(".lora_pool.default." in name for name in trainable)
    assert bool(trainable) == (loader == "load_rank1_pool_adapter")  # is_trainable=True there, peft's default here

    with torch.no_grad():
        torch.testing.assert_close(_features(loaded), expected, rtol=0, atol=0)
    _assert_same_state(loaded.merge_and_unload(), trained.merge_and_unload())


def test_loading_an_adapter_state_into_a_model_with_merges_replaces_its_history_instead_of_adding_to_it(tmp_path):
    trained = _trained_peft_model()
    trained.save_pretrained(tmp_path)
    saved = copy.deepcopy(trained)
    merge_all(trained, top_m=POOL["top_m"])  # a third merge after the save: restoring the save takes it out again
    _train_pools_by_forward(trained, seed=3)

    set_peft_model_state_dict(trained, load_peft_weights(str(tmp_path), device="cpu"))  # as a resumed run does
    pristine = dict(_hf_clip().named_parameters())
    restored, oracle_layers = dict(pool_layers(trained)), dict(pool_layers(saved))
    for name, layer in restored.items():
        expected = oracle_layers[name]
        _assert_same_state(layer, expected)  # the pool, its router, counts and merge history (not the shared weight)
        # Undoing three merges and redoing two rounds differently from the saving run's two: the tolerance rule.
        original = pristine[name.removeprefix("base_model.model.").removesuffix(".lora_pool.default") + ".weight"]
        oracle = original.double() + (layer.merged_B.double() * layer.merged_scaling) @ layer.merged_A.double()
        assert_close_by_rule(layer.weight, expected.weight, oracle, f"{name}.weight")

    # A full state_dict holds the merged base weights: loading it re-applies nothing.
    fresh = get_peft_model(_hf_clip(), rank1_pool_lora_config(target_modules=HF_TARGETS, **POOL))
    fresh.load_state_dict(saved.state_dict())
    _assert_same_state(fresh, saved)


def test_save_rank1_pool_adapter_records_the_pool_settings_and_the_loader_holds_to_them(tmp_path):
    trained = _trained_peft_model()
    with torch.no_grad():
        expected = _features(trained)
    save_rank1_pool_adapter(trained, tmp_path)
    settings = json.loads((tmp_path / POOL_SETTINGS_FILE).read_text())
    assert settings == {"k": 2, "top_m": 2, "routing": "sample", "gate": "none", "batch_first": True}

    loaded = load_rank1_pool_adapter(_hf_clip(), tmp_path)  # no setting passed: all from the file
    set_text_routing(loaded, "eot")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(_features(loaded), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"k=3 \(saved: 2\) disagree with .*rank1_pool_config.json"):
        load_rank1_pool_adapter(_hf_clip(), tmp_path, k=3)


def test_loading_a_plain_save_pretrained_needs_k_and_top_m(tmp_path):
    _trained_peft_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has no rank1_pool_config.json .* pass k=, top_m= as in training"):
        load_rank1_pool_adapter(_hf_clip(), tmp_path)


def test_save_rank1_pool_adapter_refuses_a_merged_model(tmp_path):
    trained = _trained_peft_model()
    trained.merge_adapter()
    with pytest.raises(ValueError, match=r"the model is merged .* unmerge\(\) first"):
        save_rank1_pool_adapter(trained, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
