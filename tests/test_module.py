"""FusedRank1PoolLinear as a drop-in nn.Linear: layouts, routing token, counts, merge/unmerge, state."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from rank1_kernels import FusedRank1PoolLinear, rank1_pool_linear_ref
from _tolerance import assert_close_by_rule


def _trained_layer(in_features=10, out_features=7, r=6, k=3, dtype=torch.float32, seed=0, **kwargs):
    """A pool layer whose B is non-zero, as after some training."""
    torch.manual_seed(seed)
    layer = FusedRank1PoolLinear(in_features, out_features, r=r, k=k, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_fresh_layer_equals_its_base_linear_exactly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 9)
    layer = FusedRank1PoolLinear.from_linear(linear, r=5, k=2)
    x = torch.randn(3, 4, 12)
    assert torch.equal(layer(x), linear(x))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "router.weight", "router.bias"
    }  # fmt: skip


def test_factory_arguments_and_repr():
    layer = FusedRank1PoolLinear(4, 3, bias=False, r=5, k=2, dtype=torch.float64, device="cpu")
    assert layer.bias is None and layer.weight.dtype == torch.float64 and layer.lora_A.dtype == torch.float64
    assert layer.router.weight.dtype == torch.float64
    text = repr(layer)
    assert "r=5" in text and "k=2" in text and "in_features=4" in text and "out_features=3" in text


def test_reset_parameters_gives_zero_B_and_kaiming_A():
    layer = _trained_layer()
    layer.activation_counts += 3
    layer.reset_parameters()
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.activation_counts) == 0
    bound = (1 / layer.in_features) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in
    A = layer.lora_A.detach()
    assert float(A.abs().max()) <= bound and float(A.std()) > bound / 4


def test_layouts_agree():
    layer = _trained_layer().eval()
    x = torch.randn(4, 5, 10)
    batch_first = layer(x)
    layer.batch_first = False
    torch.testing.assert_close(layer(x.transpose(0, 1)).transpose(0, 1), batch_first, rtol=0, atol=0)
    layer.batch_first = True
    torch.testing.assert_close(layer(x.reshape(20, 10), tokens_per_sample=5).reshape(4, 5, 7), batch_first, rtol=0, atol=0)
    torch.testing.assert_close(
        layer(x.reshape(20, 10), routing_tokens=x[:, 0]).reshape(4, 5, 7), batch_first, rtol=0, atol=0
    )
    # extra leading token dims fold into tokens: (N, H, W, D)
    torch.testing.assert_close(layer(x.reshape(4, 5, 1, 10)).reshape(4, 5, 7), batch_first, rtol=0, atol=0)
    single = layer(x[0, 0])
    torch.testing.assert_close(single, layer(x[:1, :1]).reshape(7), rtol=0, atol=0)


def test_two_dimensional_input_needs_the_sample_structure():
    layer = _trained_layer()
    with pytest.raises(ValueError, match="tokens_per_sample"):
        layer(torch.randn(6, 10))
    layer.tokens_per_sample = 3
    assert layer(torch.randn(6, 10)).shape == (6, 7)


def test_routing_uses_token_zero_of_each_sample():
    layer = _trained_layer().eval()
    x = torch.randn(3, 4, 10)
    y = layer(x)
    changed_later_tokens = x.clone()
    changed_later_tokens[:, 1:] = torch.randn(3, 3, 10)
    # Same routing tokens -> the same experts: token 0's outputs cannot change.
    torch.testing.assert_close(layer(changed_later_tokens)[:, 0], y[:, 0], rtol=0, atol=0)
    layer.routing_token_index = 2
    expected = layer(x.reshape(12, 10), routing_tokens=x[:, 2]).reshape(3, 4, 7)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_activation_counts_grow_in_training_only():
    layer = _trained_layer(r=6, k=3)
    x = torch.randn(5, 2, 10)
    layer.eval()
    layer(x)
    assert int(layer.activation_counts.sum()) == 0
    layer.train()
    layer(x)
    assert int(layer.activation_counts.sum()) == 5 * 3
    assert layer.activation_counts.dtype == torch.int64


def test_batch_routing_counts_every_sample():
    layer = _trained_layer(r=6, k=3, routing="batch").train()
    layer(torch.randn(4, 2, 10))
    counts = layer.activation_counts
    assert int((counts > 0).sum()) == 3 and set(counts[counts > 0].tolist()) == {4}


def test_dropout_acts_on_the_adapter_input_in_training_only():
    layer = _trained_layer(dropout=0.5)
    x = torch.randn(3, 4, 10)
    layer.eval()
    no_dropout = _trained_layer(dropout=0.0).eval()
    torch.testing.assert_close(layer(x), no_dropout(x), rtol=0, atol=0)
    layer.train()
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(first, layer(x))


def test_gradients_reach_pool_parameters_and_router_with_a_learning_gate():
    layer = _trained_layer(gate="softmax").train()
    layer(torch.randn(3, 4, 10)).square().sum().backward()
    for name in ("lora_A", "lora_B", "router.weight", "router.bias"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name
    none_gate = _trained_layer(gate="none").train()
    none_gate(torch.randn(3, 4, 10)).square().sum().backward()
    assert none_gate.router.weight.grad is None  # the paper's router: no gradient path at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_then_forward_equals_the_merged_experts_unmerged(dtype):
    layer = _trained_layer(dtype=dtype, r=6, k=3)
    layer.activation_counts.copy_(torch.tensor([5, 9, 1, 9, 0, 2]))  # top-2: 1 and 3 (tie -> lower index first)
    x = torch.randn(4, 3, 10, dtype=dtype)
    top = torch.tensor([1, 3])

    def merged_forward(work_dtype):
        cast = lambda t: t.detach().to(work_dtype)  # noqa: E731
        return rank1_pool_linear_ref(
            cast(x.reshape(12, 10)), cast(layer.weight), cast(layer.bias), cast(layer.lora_A), cast(layer.lora_B),
            top.repeat(4, 1), torch.ones(4, 2, dtype=work_dtype), layer.scaling, 3,
        ).reshape(4, 3, 7)  # fmt: skip

    oracle, same_dtype = merged_forward(torch.float64), merged_forward(dtype)
    merged = layer.merge(top_m=2)
    assert merged.tolist() == [1, 3]
    assert torch.count_nonzero(layer.lora_B) == 0 and int(layer.activation_counts.sum()) == 0
    assert layer.merged_A.shape == (2, 10) and layer.merged_B.shape == (7, 2) and layer.merge_sizes.tolist() == [2]
    assert_close_by_rule(layer.eval()(x), same_dtype, oracle, "forward after merge")
    assert_close_by_rule(layer.to_linear()(x), same_dtype, oracle, "to_linear after merge")


def test_unmerge_restores_the_weight():
    layer = _trained_layer(dtype=torch.float64)
    original = layer.weight.detach().clone()
    layer.activation_counts.copy_(torch.arange(6))
    layer.merge(top_m=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge(top_m=3)
    assert layer.merge_sizes.tolist() == [2, 3]
    layer.unmerge()
    assert layer.merge_sizes.tolist() == [2] and layer.merged_B.shape == (7, 2)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-13)
    with pytest.raises(RuntimeError, match="no merged experts"):
        layer.unmerge()


def test_state_dict_round_trip_with_history():
    layer = _trained_layer()
    layer.activation_counts.copy_(torch.arange(6))
    layer.merge(top_m=4, reset_pool=False)
    layer.activation_counts += 2
    fresh = FusedRank1PoolLinear(10, 7, r=6, k=3)
    fresh.load_state_dict(layer.state_dict())
    for name, tensor in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_empty_batch_and_noncontiguous_input():
    layer = _trained_layer().train()
    assert layer(torch.randn(0, 4, 10)).shape == (0, 4, 7)
    wide = torch.randn(3, 4, 25)
    view = wide[..., 5:15]
    assert not view.is_contiguous()
    layer.eval()
    # By the rule, not bit for bit: BLAS may round a strided input differently (MKL does on some CPUs).
    oracle = copy.deepcopy(layer).double()(view.double())
    assert_close_by_rule(layer(view), layer(view.contiguous()), oracle, "strided input")


def test_backend_choice():
    layer = _trained_layer(backend="reference")
    layer(torch.randn(2, 3, 10))
    layer.backend = "no-such-backend"
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        layer(torch.randn(2, 3, 10))


def test_torch_compile_fullgraph_matches_eager():
    """No graph breaks: routing, the finiteness check, counting and the op all trace."""
    layer = _trained_layer(gate="softmax")
    x = torch.randn(3, 4, 10)
    compiled = torch.compile(layer, fullgraph=True)
    layer.eval()
    oracle = copy.deepcopy(layer).double()(x.double())
    assert_close_by_rule(compiled(x), layer(x), oracle, "compiled forward")
    layer.train()
    compiled(x).sum().backward()
    assert int(layer.activation_counts.sum()) == 3 * 3 and layer.router.weight.grad is not None


def test_first_use_inside_torch_compile_compiles_once():
    """In a fresh process (no backend used yet), a compiled layer's second call reuses the first graph: choosing
    the backend while tracing must leave no state behind that the graph's guards then see changed."""
    script = textwrap.dedent("""
        import torch
        from torch._dynamo.utils import counters
        from rank1_kernels import FusedRank1PoolLinear
        layer = FusedRank1PoolLinear(10, 6, r=5, k=2).train()
        compiled = torch.compile(layer)
        for _ in range(3):
            compiled(torch.randn(3, 4, 10)).sum().backward()
        print("graphs", counters["stats"]["unique_graphs"])
    """)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "graphs 1" in result.stdout.splitlines(), result.stdout


def test_layer_with_all_experts_equals_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    base = torch.nn.Sequential(torch.nn.Linear(10, 7)).double()
    layer = FusedRank1PoolLinear.from_linear(base[0], r=6, k=6, alpha=1.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    model = peft.get_peft_model(base, peft.LoraConfig(r=6, lora_alpha=1, target_modules=["0"], lora_dropout=0.0))
    lora = model.base_model.model[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(layer.lora_A)
        lora.lora_B["default"].weight.copy_(layer.lora_B)
    assert lora.scaling["default"] == layer.scaling
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), model(x), rtol=0, atol=1e-12)


def test_cast_keeps_the_merge_scales_exact():
    """merged_scaling stays float64 (alpha / r exactly) through .to(dtype), half() and loading: a cast would round
    1/12 to 0.0835 and unmerge() would no longer undo the merge made."""
    layer = _trained_layer(r=12, k=3)
    layer.activation_counts.copy_(torch.arange(12))
    layer.merge(top_m=4)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        cast_layer = cast(copy.deepcopy(layer))
        assert cast_layer.merged_scaling.dtype == torch.float64
        assert cast_layer.merged_scaling.tolist() == [1 / 12] * 4
    fresh = FusedRank1PoolLinear(10, 7, r=12, k=3, dtype=torch.bfloat16)
    fresh.load_state_dict(layer.to(torch.bfloat16).state_dict())
    assert fresh.merged_scaling.dtype == torch.float64 and fresh.merged_scaling.tolist() == [1 / 12] * 4


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_2d_batch_with_no_routing_tokens(backend):
    layer = FusedRank1PoolLinear(4, 3, r=4, k=2, backend=backend)
    y = layer(torch.randn(0, 4), routing_tokens=torch.randn(0, 4))
    assert y.shape == (0, 3)
    with pytest.raises(ValueError, match=r"6 rows cannot be split evenly over 0 routing tokens"):
        layer(torch.randn(6, 4), routing_tokens=torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"7 rows cannot be split evenly over 2 routing tokens"):
        layer(torch.randn(7, 4), routing_tokens=torch.randn(2, 4))


def test_routing_tokens_must_be_one_per_sample():
    layer = _trained_layer()
    with pytest.raises(ValueError, match=r"routing_tokens has 2 rows for the 3 samples of x \(3, 4, 10\)"):
        layer(torch.randn(3, 4, 10), routing_tokens=torch.randn(2, 10))


def test_samples_without_tokens_give_an_empty_output():
    layer = _trained_layer().train()
    x = torch.randn(3, 0, 10, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 0, 7) and int(layer.activation_counts.sum()) == 0
    layer.batch_first = False
    assert layer(torch.randn(0, 3, 10)).shape == (0, 3, 7)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_counts_each_choice_once(use_reentrant):
    """Checkpointing runs the layer's forward again in the backward; that recomputation must not count again."""
    layer = _trained_layer().train()
    x = torch.randn(3, 4, 10, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant)
    y.square().sum().backward()
    assert int(layer.activation_counts.sum()) == 3 * 3
    assert layer.lora_A.grad is not None and x.grad is not None
