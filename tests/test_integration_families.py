"""inject() on every model family it recognises, with tiny random-init models: outputs unchanged before training,
end-of-text routing in causal text towers, tower and pattern selection, timm's fused qkv split into three pools,
and merge_all + unload giving back plain modules of the original types that load with no knowledge of this package."""

from __future__ import annotations

import collections
import copy
import importlib.util
import io
import pathlib

import pytest
import torch
import torch.nn as nn

from rank1_kernels import FusedRank1PoolLinear, inject, merge_all, pool_layers, unload
from rank1_kernels.families import SplitQKVLinear, detect_family, find_towers
from _tolerance import assert_close_by_rule

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


openai_layout = _load_example("openai_clip_layout")
CONTEXT, VOCAB, IMAGE = 12, 100, 32


def _images(n=3, seed=0):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _captions(n=3, seed=0, eos=VOCAB - 1):
    ids = openai_layout.random_captions(n, CONTEXT, VOCAB, generator=torch.Generator().manual_seed(seed))
    return torch.where(ids == VOCAB - 1, torch.full_like(ids, eos), ids)


# ---- the families, tiny and random ------------------------------------------------------------------------------


def _open_clip(batch_first: bool):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=IMAGE),
        text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=4, layers=2),
    )
    if not batch_first:  # open_clip before 2.24 ran its blocks sequence-first
        for module in model.modules():
            if hasattr(module, "resblocks"):
                module.batch_first = False
            if isinstance(module, nn.MultiheadAttention):
                module.batch_first = False
    return model


def _openai_clip():
    torch.manual_seed(0)
    return openai_layout.CLIP(context_length=CONTEXT, vocab_size=VOCAB, image_resolution=IMAGE)


def _hf_config():
    transformers = pytest.importorskip("transformers")
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=CONTEXT, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 3, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=8
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _hf_clip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.CLIPModel(_hf_config())


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8, depth=2, num_classes=5
    )


def _clip_layout_outputs(model, dtype=torch.float32):
    return {"image": model.encode_image(_images().to(dtype)), "text": model.encode_text(_captions())}


def _hf_outputs(model, dtype=torch.float32):
    out = model(input_ids=_captions(eos=VOCAB - 3), pixel_values=_images().to(dtype))
    return {"image": out.image_embeds, "text": out.text_embeds}


def _timm_outputs(model, dtype=torch.float32):
    return {"image": model(_images().to(dtype))}


# name -> (builder, outputs(model, dtype), pool layers per tower kind, family)
FAMILIES = {
    "open_clip": (lambda: _open_clip(True), _clip_layout_outputs, {"vision": 12, "text": 12}, "open_clip"),
    "open_clip_seq_first": (lambda: _open_clip(False), _clip_layout_outputs, {"vision": 12, "text": 12}, "open_clip"),
    "openai_clip": (_openai_clip, _clip_layout_outputs, {"vision": 12, "text": 12}, "openai_clip"),
    "hf_clip": (_hf_clip, _hf_outputs, {"vision": 12, "text": 12}, "hf_clip"),
    "timm_vit": (_timm_vit, _timm_outputs, {"vision": 12}, "timm_vit"),
}


def _tower_kind_of(model, name):
    return next(tower.kind for tower in find_towers(model) if tower.contains(name))


def _module_types(model):
    return collections.Counter(type(module).__name__ for module in model.modules())


def _train_pools_at_random(model, seed=3):
    """Stand-in for a task of training: random B columns and activation counts in every pool layer."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in pool_layers(model):
        with torch.no_grad():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
            layer.activation_counts.copy_(torch.randperm(layer.r, generator=generator))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_with_its_towers(family):
    build, _, counts, expected_family = FAMILIES[family]
    model = build()
    assert detect_family(model) == expected_family
    assert sorted(tower.kind for tower in find_towers(model)) == sorted(counts)


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_computes_what_the_original_computed(family):
    build, outputs, counts, _ = FAMILIES[family]
    original = build().eval()
    with torch.no_grad():
        oracle = outputs(copy.deepcopy(original).double(), torch.float64)
        reference = outputs(original)
    model = inject(copy.deepcopy(original)).eval()
    per_tower = collections.Counter(_tower_kind_of(model, name) for name, _ in pool_layers(model))
    assert dict(per_tower) == counts
    with torch.no_grad():
        actual = outputs(model)
    for key in oracle:
        assert_close_by_rule(actual[key], reference[key], oracle[key], f"{family} {key} features after inject")


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_all_and_unload_give_original_module_types_loadable_without_this_package(family):
    build, outputs, _, _ = FAMILIES[family]
    original = build().eval()
    model = inject(copy.deepcopy(original)).eval()
    _train_pools_at_random(model)
    merge_all(model, top_m=2)
    with torch.no_grad():
        merged_injected = outputs(model)
    unload(model)

    assert not any(isinstance(m, (FusedRank1PoolLinear, SplitQKVLinear)) for m in model.modules())
    assert _module_types(model) == _module_types(original)
    assert model.state_dict().keys() == original.state_dict().keys()
    assert all(not module._forward_pre_hooks for module in model.modules())

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = build().eval()  # built and loaded by code that knows nothing of rank1_kernels
    reloaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    with torch.no_grad():
        unloaded, from_disk = outputs(model), outputs(reloaded)
        unloaded_fp64 = outputs(copy.deepcopy(model).double(), torch.float64)
        before = outputs(original)
    # What was saved is what was loaded, bit for bit; the two models' outputs then differ only as BLAS may round
    # differently for differently laid-out weights (MKL does on some CPUs), which the rule allows.
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    for key in unloaded:
        assert_close_by_rule(from_disk[key], unloaded[key], unloaded_fp64[key], f"{family} {key} reloaded")
        assert_close_by_rule(merged_injected[key], unloaded[key], unloaded_fp64[key], f"{family} {key} merged")
        assert (unloaded[key] - before[key]).abs().max() > 1e-4, "the merge changed nothing"


TEXT_FAMILIES = [name for name, entry in FAMILIES.items() if "text" in entry[2]]


def _first_text_layer(model):
    return next((name, layer) for name, layer in pool_layers(model) if _tower_kind_of(model, name) == "text")


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("text_routing", ["eot", "first"])
def test_text_tower_layers_route_on_the_end_of_text_token(family, text_routing):
    """In situ: the output of a text-tower pool layer equals the layer run with its routing token given
    explicitly: the end-of-text token of each caption ("eot"), or token 0 ("first")."""
    build, outputs, _, _ = FAMILIES[family]
    model = inject(build(), text_routing=text_routing, k=2).eval()
    _train_pools_at_random(model)
    name, layer = _first_text_layer(model)
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, output: captured.update(x=args[0], y=output))
    with torch.no_grad():
        outputs(model)
    handle.remove()
    ids = _captions(eos=VOCAB - 3) if family == "hf_clip" else _captions()
    eos = VOCAB - 3 if family == "hf_clip" else VOCAB - 1
    expected_positions = (
        (ids == eos).int().argmax(dim=-1) if text_routing == "eot" else torch.zeros(3, dtype=torch.int64)
    )
    assert len(set(expected_positions.tolist())) > 1 or text_routing == "first"
    x = captured["x"] if layer.batch_first else captured["x"].transpose(0, 1)
    routing_tokens = x[torch.arange(x.shape[0]), expected_positions]
    saved_positions, layer.routing_positions = layer.routing_positions, None
    with torch.no_grad():
        expected = layer(x, routing_tokens=routing_tokens)
    layer.routing_positions = saved_positions
    actual = captured["y"] if layer.batch_first else captured["y"].transpose(0, 1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    if text_routing == "eot":
        assert torch.equal(layer.routing_positions, expected_positions), name
    else:
        assert layer.routing_positions is None


@pytest.mark.parametrize("family", ["open_clip", "openai_clip", "hf_clip"])
def test_towers_and_patterns_select_the_layers(family):
    build = FAMILIES[family][0]
    vision_only = inject(build(), towers="vision")
    assert {_tower_kind_of(vision_only, n) for n, _ in pool_layers(vision_only)} == {"vision"}
    assert all(layer.routing_positions is None for _, layer in pool_layers(vision_only))
    text_only = inject(build(), towers=["text"])
    assert {_tower_kind_of(text_only, n) for n, _ in pool_layers(text_only)} == {"text"}
    mlp_pattern = "mlp.fc1" if family == "hf_clip" else "mlp.c_fc"
    text_mlp = inject(build(), target=mlp_pattern, towers="text")
    names = [n for n, _ in pool_layers(text_mlp)]
    assert len(names) == 2 and all(n.endswith(mlp_pattern) and _tower_kind_of(text_mlp, n) == "text" for n in names)


def test_timm_fused_qkv_gets_one_pool_per_slice_and_unloads_to_the_fused_linear():
    model = inject(_timm_vit())
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, SplitQKVLinear)
    assert all(
        isinstance(p, FusedRank1PoolLinear) and p.out_features == 192 for p in (qkv.q_proj, qkv.k_proj, qkv.v_proj)
    )
    assert len({id(p.lora_A) for p in (qkv.q_proj, qkv.k_proj, qkv.v_proj)}) == 3
    unload(model)
    assert type(model.blocks[0].attn.qkv) is nn.Linear and model.blocks[0].attn.qkv.out_features == 576

    only_q_and_v = inject(_timm_vit(), attention_projections=("q", "v"))
    qkv = only_q_and_v.blocks[0].attn.qkv
    assert isinstance(qkv.q_proj, FusedRank1PoolLinear) and type(qkv.k_proj) is nn.Linear
    assert len(dict(pool_layers(only_q_and_v))) == 2 * 5


def test_generic_models_keep_the_default_targets():
    block = nn.Module()
    block.attn = nn.MultiheadAttention(8, 2)
    block.mlp = nn.Sequential(collections.OrderedDict(c_fc=nn.Linear(8, 16), c_proj=nn.Linear(16, 8)))
    assert detect_family(block) == "generic"
    inject(block, r=4, k=2)
    assert len(dict(pool_layers(block))) == 6


def test_bad_tower_and_routing_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="expected a subset of"):
        inject(_openai_clip(), towers="audio")
    with pytest.raises(ValueError, match="has no \\['text'\\] tower"):
        inject(_timm_vit(), towers="text")
    with pytest.raises(ValueError, match="no vision or text tower"):
        inject(nn.Sequential(nn.Linear(4, 4)), target="0", towers="vision")
    with pytest.raises(ValueError, match="text_routing="):
        inject(_openai_clip(), text_routing="pooled")


def test_stale_routing_positions_for_another_batch_size_are_refused():
    model = inject(_openai_clip()).eval()
    with torch.no_grad():
        model.encode_text(_captions(3))
    _, layer = _first_text_layer(model)
    with pytest.raises(ValueError, match="routing_positions must be int64 of shape \\(n_samples=2,\\)"):
        layer(torch.randn(2, CONTEXT, layer.in_features))


def test_a_refused_text_routing_leaves_the_model_untouched():
    model = _openai_clip()
    with pytest.raises(ValueError, match="text_routing="):
        inject(model, text_routing="pooled")
    assert not list(pool_layers(model))


def test_the_end_of_text_hook_follows_a_deep_copy_of_the_model():
    model = inject(_openai_clip()).eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.encode_text(_captions(3))
    _, clone_layer = _first_text_layer(clone)
    _, original_layer = _first_text_layer(model)
    assert clone_layer.routing_positions is not None and original_layer.routing_positions is None
