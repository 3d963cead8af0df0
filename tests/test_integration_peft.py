"""The peft bridge: the pool layer through get_peft_model (LoraConfig with a custom module mapping) computes what
inject() computes, trains only the pool, runs the continual life cycle, and merge_and_unload gives the weights of
merge_all + unload."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import get_peft_model  # noqa: E402

from rank1_kernels import PoolLifecycle, inject, merge_all, pool_layers, unload  # noqa: E402
from rank1_kernels.families import set_text_routing  # noqa: E402
from rank1_kernels.integrations.peft_bridge import Rank1PoolLoraLinear, rank1_pool_lora_config  # noqa: E402
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
