"""Bad input gets an error that says what was wrong and what was expected."""

import pytest
import torch

from rank1_kernels import FusedRank1PoolLinear, PoolConfig, ago_loss, inject, rank1_pool_linear, route


def _layer(**kwargs):
    return FusedRank1PoolLinear(8, 5, **{"r": 6, "k": 3, **kwargs})


def test_wrong_feature_size():
    with pytest.raises(ValueError, match=r"x has last dimension 7 but 8 was expected \(in_features"):
        _layer()(torch.randn(2, 3, 7))


@pytest.mark.parametrize("k", [0, -1, 7])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"k={k} is out of range: expected 1 <= k <= r=6"):
        _layer(k=k)


def test_k_out_of_range_in_route_and_op():
    with pytest.raises(ValueError, match="k=9 is out of range"):
        route(torch.randn(2, 4), torch.randn(6, 4), None, 9)
    x = torch.randn(4, 8)
    idx = torch.zeros(2, 7, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"idx.shape\[1\] \(k\)=7 is out of range"):
        rank1_pool_linear(x, torch.randn(5, 8), None, torch.randn(6, 8), torch.randn(5, 6), idx, torch.ones(2, 7), 1.0, 2)


def test_dtype_mismatch():
    with pytest.raises(ValueError, match=r"weight has dtype torch.float32 but x has dtype torch.float64; cast"):
        _layer()(torch.randn(2, 3, 8, dtype=torch.float64))


def test_device_mismatch():
    layer = _layer()
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta"):
        layer(torch.empty(2, 3, 8, device="meta"))


def test_tokens_per_sample_must_divide_rows():
    with pytest.raises(ValueError, match=r"tokens_per_sample=4 does not divide the 6 input rows"):
        _layer()(torch.randn(6, 8), tokens_per_sample=4)
    with pytest.raises(ValueError, match=r"6 rows cannot be split evenly over 4 routing tokens"):
        _layer()(torch.randn(6, 8), routing_tokens=torch.randn(4, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_routing_scores(bad):
    x = torch.randn(3, 2, 8)
    x[1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"routing scores contain NaN or Inf \(first at sample 1"):
        _layer()(x)


def test_unknown_routing_and_gate_names():
    with pytest.raises(ValueError, match=r"routing='token' is not supported; expected one of 'sample', 'batch'"):
        _layer(routing="token")
    with pytest.raises(ValueError, match=r"gate='relu' is not supported"):
        _layer(gate="relu")
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        _layer(dropout=1.0)


def test_op_shape_errors():
    x, weight = torch.randn(4, 8), torch.randn(5, 8)
    A, B, idx, gates = torch.randn(6, 8), torch.randn(5, 6), torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"B must have shape \(d_out=5, r=6\)"):
        rank1_pool_linear(x, weight, None, A, B.t(), idx, gates, 1.0, 2)
    with pytest.raises(ValueError, match=r"idx must be int64"):
        rank1_pool_linear(x, weight, None, A, B, idx.int(), gates, 1.0, 2)
    with pytest.raises(ValueError, match=r"idx must have shape \(n_samples=4, k\)"):
        rank1_pool_linear(x, weight, None, A, B, idx, gates, 1.0, 1)
    with pytest.raises(ValueError, match=r"idx holds expert 6, outside \[0, r=6\)"):
        rank1_pool_linear(x, weight, None, A, B, idx + 6, gates, 1.0, 2)


def test_ago_errors():
    B_cur, B_prev = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"p=3 is not supported"):
        ago_loss(B_cur, B_prev, torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool), p=3)
    with pytest.raises(ValueError, match=r"masks must have one entry per column"):
        ago_loss(B_cur, B_prev, torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"same d_out"):
        ago_loss(B_cur, torch.randn(6, 3), torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be bool .* got cur_mask torch.float32"):
        ago_loss(B_cur, B_prev, torch.tensor([0.5, 1.0, 0.0, 1.0]), torch.ones(3, dtype=torch.bool))
    # B on another device than the masks ("meta" stands in for a GPU here): refused before any kernel reads them.
    with pytest.raises(ValueError, match=r"masks \(on cpu and cpu\) must be on B's device meta"):
        ago_loss(B_cur.to("meta"), B_prev.to("meta"), torch.ones(4, dtype=torch.bool), torch.ones(3, dtype=torch.bool))


def test_inject_errors():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"inject\(\) matched no nn.Linear or nn.MultiheadAttention"):
        inject(model)
    with pytest.raises(ValueError, match=r"attention_projections has \['x'\]"):
        PoolConfig(attention_projections=("q", "x"))
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear"):
        FusedRank1PoolLinear.from_linear(torch.nn.Conv1d(2, 2, 1))


@pytest.mark.gpu
def test_non_finite_routing_scores_on_gpu_are_checked_when_asked():
    from rank1_kernels import set_device_sync_checks

    layer = _layer().cuda()
    x = torch.randn(3, 2, 8, device="cuda")
    x[1, 0, 2] = float("nan")
    layer(x)  # no host sync by default: the NaN shows in the output instead
    set_device_sync_checks(True)
    try:
        with pytest.raises(ValueError, match=r"routing scores contain NaN or Inf"):
            layer(x)
    finally:
        set_device_sync_checks(False)


@pytest.mark.gpu
def test_expert_indices_out_of_range_on_gpu_are_checked_when_asked():
    from rank1_kernels import set_device_sync_checks

    x, weight = torch.randn(4, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    A, B, gates = torch.randn(6, 8, device="cuda"), torch.randn(5, 6, device="cuda"), torch.ones(2, 3, device="cuda")
    idx = torch.full((2, 3), 6, dtype=torch.int64, device="cuda")
    set_device_sync_checks(True)
    try:
        with pytest.raises(ValueError, match=r"idx holds expert 6, outside \[0, r=6\)"):
            rank1_pool_linear(x, weight, None, A, B, idx, gates, 1.0, 2)
    finally:
        set_device_sync_checks(False)


def test_a_backend_whose_factory_fails_registers_nothing(monkeypatch):
    from rank1_kernels import backends

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_INSTANCES", dict(backends._INSTANCES))

    def no_driver():
        raise RuntimeError("no driver")

    with pytest.raises(RuntimeError, match="no driver"):
        backends.register_backend("broken", 1, no_driver)
    assert "broken" not in backends.available_backends()
    x, weight, A, B = torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    idx, gates = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    assert backends.resolve_backend("auto", "pool_linear", [x, weight, A, B, idx, gates]).name == "reference"
