"""inject(): open_clip ViT-B/16 and nn.MultiheadAttention become pool layers that compute what they replaced."""

import copy

import pytest
import torch
import torch.nn as nn

from rank1_kernels import (
    current_top_masks,
    FusedRank1PoolLinear,
    PoolMultiheadAttention,
    ago_penalty,
    inject,
    mark_only_pool_trainable,
    merge_all,
    pool_layers,
    unload,
)
from _tolerance import assert_close_by_rule


def _mha_inputs(batch_first, n=3, length=6, embed=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, length, embed) if batch_first else (length, n, embed)
    return torch.randn(*shape, generator=g, dtype=dtype)


MASK_CASES = ["none", "bool_causal", "float_causal", "padding", "padding_and_causal", "per_head_3d"]


def _masks(case, n=3, length=6, heads=4):
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[1, -2:] = True
    if case == "none":
        return {}
    if case == "bool_causal":
        return {"attn_mask": causal}
    if case == "float_causal":
        return {"attn_mask": torch.zeros(length, length).masked_fill(causal, float("-inf"))}
    if case == "padding":
        return {"key_padding_mask": padding}
    if case == "padding_and_causal":
        return {"key_padding_mask": padding, "attn_mask": causal}
    return {"attn_mask": torch.randn(n * heads, length, length)}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("need_weights", [False, True])
def test_pool_attention_equals_nn_multihead_attention(batch_first, case, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    x64 = _mha_inputs(batch_first, dtype=torch.float64)
    masks64 = {k: (v.double() if v.is_floating_point() else v) for k, v in _masks(case).items()}
    oracle, oracle_weights = mha(x64, x64, x64, need_weights=need_weights, **masks64)
    mha32 = copy.deepcopy(mha).float()
    x32 = x64.float()
    masks32 = {k: (v.float() if v.is_floating_point() else v) for k, v in masks64.items()}
    reference, reference_weights = mha32(x32, x32, x32, need_weights=need_weights, **masks32)
    wrapped = nn.Sequential()
    wrapped.attn = copy.deepcopy(mha32)
    inject(wrapped, target="attn", r=4, k=2)
    assert isinstance(wrapped.attn, PoolMultiheadAttention)
    actual, actual_weights = wrapped.attn(x32, x32, x32, need_weights=need_weights, **masks32)
    assert_close_by_rule(actual, reference, oracle, f"attention output ({case})")
    if need_weights:
        assert_close_by_rule(actual_weights, reference_weights, oracle_weights, f"attention weights ({case})")
    else:
        assert actual_weights is None and reference_weights is None


def test_pool_attention_per_head_weights_and_unbatched_input():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    pool = PoolMultiheadAttention.from_mha(mha, lambda role, linear: linear).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    expected, expected_weights = mha(x, x, x, average_attn_weights=False)
    actual, actual_weights = pool(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(actual_weights, expected_weights, rtol=0, atol=1e-12)
    single = x[0]
    torch.testing.assert_close(pool(single, single, single)[0], mha(single, single, single)[0], rtol=0, atol=1e-12)


def test_sequence_first_mlp_linears_route_per_sample():
    """In a sequence-first block (OpenAI CLIP), the MLP's pools must route on token 0 of each sample, not on
    the first sample's tokens."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)  # sequence-first
            self.mlp = nn.Sequential()
            self.mlp.c_fc = nn.Linear(8, 16)

    block = Block()
    inject(block, target=("attn", "mlp.c_fc"), r=4, k=2)
    assert block.mlp.c_fc.batch_first is False and block.attn.q_proj.batch_first is True


@pytest.fixture(scope="module")
def vit_b16():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return model


def test_open_clip_vit_b16_injection_counts(vit_b16):
    model = copy.deepcopy(vit_b16)
    inject(model)
    layers = dict(pool_layers(model))
    assert len(layers) == 144
    visual = [n for n in layers if n.startswith("visual.")]
    assert len(visual) == 72 and all(isinstance(m, FusedRank1PoolLinear) for m in layers.values())
    assert mark_only_pool_trainable(model) == 4_978_368  # the paper's figure, with routers
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if "router" not in n) == 3_317_760  # without routers
    assert all(n.rsplit(".", 2)[-2] in ("router",) or n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_open_clip_vit_b16_outputs_unchanged_by_injection(vit_b16):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    text = torch.randint(0, 49408, (2, 77))
    oracle_model = copy.deepcopy(vit_b16).double()
    with torch.no_grad():
        oracle_image, oracle_text = oracle_model.encode_image(images.double()), oracle_model.encode_text(text)
        reference_image, reference_text = vit_b16.encode_image(images), vit_b16.encode_text(text)
    del oracle_model
    model = inject(copy.deepcopy(vit_b16))
    with torch.no_grad():
        image, text_features = model.encode_image(images), model.encode_text(text)
    assert_close_by_rule(image, reference_image, oracle_image, "ViT-B/16 image features")
    assert_close_by_rule(text_features, reference_text, oracle_text, "ViT-B/16 text features")


def test_merge_all_then_unload_gives_plain_modules_with_the_merged_function(vit_b16):
    model = copy.deepcopy(vit_b16)
    inject(model, r=6, k=3)
    torch.manual_seed(2)
    for _, layer in pool_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.02)
            layer.activation_counts.copy_(torch.randperm(6))
    merged = merge_all(model, top_m=2)
    assert len(merged) == 144 and all(v.shape == (2,) for v in merged.values())
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled = model.encode_image(images)  # fresh pools after the merge contribute nothing
    unload(model)
    assert not any(isinstance(m, (FusedRank1PoolLinear, PoolMultiheadAttention)) for m in model.modules())
    block = model.visual.transformer.resblocks[0]
    assert type(block.attn) is nn.MultiheadAttention and type(block.mlp.c_fc) is nn.Linear
    with torch.no_grad():
        plain = model.encode_image(images)
        oracle = copy.deepcopy(model).double().encode_image(images.double())
    assert_close_by_rule(pooled, plain, oracle, "merged pool model vs the unloaded plain model")
    # A plain model: loads into an un-injected copy with strict key matching.
    fresh = copy.deepcopy(vit_b16)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_inject_and_unload_keep_what_was_frozen_frozen_and_what_was_trainable_trainable():
    frozen = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    frozen.requires_grad_(False)
    unload(inject(frozen, target="*", r=4, k=2))
    assert not any(p.requires_grad for p in frozen.parameters())

    # Only q and v become pools: k and out stay plain, trainable linears, and the packed in_proj_weight they
    # return to is trainable because its k rows were.
    trainable = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    inject(trainable, target="self_attn", r=4, k=2, attention_projections=("q", "v"))
    attention = trainable.self_attn
    assert attention.k_proj.weight.requires_grad and attention.out_proj.weight.requires_grad
    assert not attention.q_proj.weight.requires_grad  # a pool's base weight is frozen
    unload(trainable)
    parameters = dict(trainable.self_attn.named_parameters())
    assert parameters["in_proj_weight"].requires_grad and parameters["out_proj.weight"].requires_grad

    # A fused qkv whose k slice stayed a plain trainable Linear: trainable again as one, in any grad mode.
    from rank1_kernels.families import SplitQKVLinear

    split = SplitQKVLinear.from_linear(nn.Linear(8, 24), lambda role, linear: linear if role == "k" else
                                       FusedRank1PoolLinear.from_linear(linear, r=4, k=2))  # fmt: skip
    with torch.inference_mode():
        fused = split.to_linear()
    assert fused.weight.requires_grad and fused.bias.requires_grad


def test_ago_penalty_is_mean_over_layers():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject(model, target=("0", "2"), r=4, k=2)
    assert float(ago_penalty(model, top_m=2).detach()) == 0.0  # nothing merged yet
    torch.manual_seed(3)
    for _, layer in pool_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    merge_all(model, top_m=2)
    for _, layer in pool_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.activation_counts.copy_(torch.tensor([0, 5, 1, 5]))
    penalty = ago_penalty(model, top_m=2)
    expected = []
    for _, layer in pool_layers(model):
        gram = layer.lora_B[:, [1, 3]].t() @ layer.merged_B
        expected.append(gram.abs().sum())
    torch.testing.assert_close(penalty, torch.stack(expected).mean())
    penalty.backward()
    assert all(torch.count_nonzero(layer.lora_B.grad[:, [0, 2]]) == 0 for _, layer in pool_layers(model))


def test_current_top_masks_match_each_layers_own_mask():
    """One sort per group of layers (same r): the masks each layer would give on its own, ties to the lowest index,
    across layers of two pool sizes interleaved."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 3))
    inject(model, target=("0", "2"), r=6, k=2)
    inject(model, target=("1", "3"), r=4, k=2)
    layers = [layer for _, layer in pool_layers(model)]
    assert sorted(layer.r for layer in layers) == [4, 4, 6, 6]
    g = torch.Generator().manual_seed(5)
    for layer in layers:
        layer.activation_counts.copy_(torch.randint(0, 3, (layer.r,), generator=g))  # many ties
    for top_m in (1, 2, 4):
        masks = current_top_masks(layers, top_m)
        for layer, mask in zip(layers, masks):
            assert mask.dtype == torch.bool and torch.equal(mask, layer.current_top_mask(top_m)), (layer.r, top_m)
    with pytest.raises(ValueError, match="top_m"):
        current_top_masks(layers, 5)  # more than the 4-expert layers have


def test_transformer_encoder_runs_in_eval_mode_through_the_pools():
    """nn.TransformerEncoderLayer's fused fast path (eval, batch-first) reads the attention's packed in-projection;
    PoolMultiheadAttention has none, so the layer takes its module path, through the pools."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    reference = copy.deepcopy(model)
    inject(model, target=("self_attn", "linear1", "linear2"), r=4, k=2, backend="reference")
    for _, pool in pool_layers(model):
        with torch.no_grad():
            pool.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = model.eval()(x)
        assert not torch.allclose(y, reference.eval()(x), atol=1e-3), "the pools were bypassed"
        torch.testing.assert_close(y, model.train()(x))  # dropout 0: the module path in training mode too


def test_inject_twice_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    inject(model, target="*", r=4, k=2)
    layers = [layer for _, layer in pool_layers(model)]
    inject(model, target="*", r=4, k=2)
    assert [layer for _, layer in pool_layers(model)] == layers and len(layers) == 2
    assert isinstance(layers[0].router, nn.Linear)
    with pytest.raises(ValueError, match="the model has 2 pool layers already"):
        inject(model, target=lambda name, module: isinstance(module, nn.Linear) and name.endswith("router"))


def test_inject_again_with_other_settings_is_refused_not_silently_ignored():
    """inject() does not rebuild pools: a second call asking for another r (or k, gate, ...) used to keep the first
    call's pools without a word."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "fc": nn.Linear(8, 8)})
    inject(model, target=("attn", "fc"), r=4, k=2)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'attn.q_proj' is a pool layer already, with r=4 \(this call asks for 8\)"):
        inject(model, target=("attn", "fc"), r=8, k=2)
    with pytest.raises(ValueError, match=r"'fc' is a pool layer already, with gate='none' \(this call asks for 'softmax'\)"):
        inject(model, target="fc", r=4, k=2, gate="softmax")
    with pytest.raises(ValueError, match="set each pool layer's .backend"):
        inject(model, target="fc", r=4, k=2, backend="reference")
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    inject(model, target=("attn", "fc"), r=4, k=2)  # the same settings: nothing to do


def test_a_module_used_twice_is_replaced_everywhere_by_one_pool():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    inject(model, target="a.0", r=4, k=2)
    assert isinstance(model["a"][0], FusedRank1PoolLinear) and model["a"][0] is model["b"][0]
    assert len(list(pool_layers(model))) == 1


def test_top_level_linears_are_batch_first_beside_sequence_first_blocks():
    """A stem and a head outside the blocks see batch-first input even when the blocks' attention is
    sequence-first; the blocks' own Linears take the attention's layout."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(8, 2), nn.Linear(8, 8)

    model = nn.ModuleDict({"stem": nn.Linear(8, 8), "blocks": nn.ModuleList([Block()]), "head": nn.Linear(8, 8)})
    inject(model, target=("stem", "head", "fc"), r=4, k=2)
    assert model["stem"].batch_first and model["head"].batch_first
    assert not model["blocks"][0].fc.batch_first


def test_auto_on_an_unknown_model_says_which_generic_patterns_found_nothing():
    """A model of no known family gets DEFAULT_TARGETS; layers named fc1/fc2 would get no pool, silently."""
    import warnings

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    with pytest.warns(UserWarning, match=r"\['mlp.c_fc', 'mlp.c_proj'\] matched nothing \(1 module\(s\) injected\)"):
        inject(Block(), r=4, k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(Block(), target=["attn", "fc1", "fc2"], r=4, k=2)  # chosen patterns: nothing to say
