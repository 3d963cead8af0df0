"""The reference ops: gradients by gradcheck in float64, semantics against hand-worked and independent forms."""

import pytest
import torch

from _tolerance import assert_close_by_rule

from rank1_kernels import ago_loss, ago_loss_grouped, ago_loss_grouped_ref, ago_loss_ref, rank1_pool_linear_ref, route


def _random_pool(n_samples, tokens, d_in, d_out, r, k, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples * tokens, d_in, generator=g, dtype=dtype)
    weight = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    bias = torch.randn(d_out, generator=g, dtype=dtype)
    A = torch.randn(r, d_in, generator=g, dtype=dtype)
    B = torch.randn(d_out, r, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(r, generator=g)[:k] for _ in range(n_samples)]) if n_samples else torch.zeros(0, k, dtype=torch.int64)
    gates = torch.rand(n_samples, k, generator=g, dtype=dtype) + 0.5
    return x, weight, bias, A, B, idx, gates


# ---- route -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_route_gates_gradcheck(mode, gate):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t, w, b: route(t, w, b, 3, mode, gate)[1], (tokens, weight, bias))


def test_route_gate_none_is_constant_and_softmax_renormalises():
    scores_source = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    eye = torch.eye(4, dtype=torch.float64)
    idx, gates = route(scores_source.double(), eye, None, 2, "sample", "none")
    assert idx.tolist() == [[1, 3]] and gates.tolist() == [[1.0, 1.0]] and not gates.requires_grad
    _, soft = route(scores_source.double(), eye, None, 2, "sample", "softmax")
    expected = torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(soft[0], expected, rtol=0, atol=1e-15)
    _, sig = route(scores_source.double(), eye, None, 2, "sample", "sigmoid")
    torch.testing.assert_close(sig[0], torch.sigmoid(torch.tensor([3.0, 2.0], dtype=torch.float64)), rtol=0, atol=1e-15)


def test_route_ties_go_to_the_lowest_index():
    tokens = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    idx, _ = route(tokens, torch.eye(5), None, 3)
    assert idx.tolist() == [[0, 1, 3]]


def test_batch_mode_hand_worked_example():
    # Scores are the tokens themselves (identity router). r = 5, k = 2.
    # sample 0 top-2: {3, 1}; sample 1: {1, 0}; sample 2: {4, 1}; sample 3: {3, 4}
    # votes: e0 1, e1 3, e2 0, e3 2, e4 2 -> the 2 most voted: e1 (3), then e3/e4 tie at 2 -> lowest index e3.
    tokens = torch.tensor(
        [
            [0.1, 0.8, 0.0, 0.9, 0.2],
            [0.7, 0.9, 0.1, 0.0, 0.3],
            [0.0, 0.5, 0.1, 0.2, 0.6],
            [0.1, 0.2, 0.0, 0.9, 0.8],
        ]
    )
    idx, gates = route(tokens, torch.eye(5), None, 2, "batch", "none")
    assert idx.tolist() == [[1, 3]] * 4
    assert gates.tolist() == [[1.0, 1.0]] * 4
    per_sample, _ = route(tokens, torch.eye(5), None, 2, "sample")
    assert per_sample.tolist() == [[3, 1], [1, 0], [4, 1], [3, 4]]


def test_route_empty_batch():
    idx, gates = route(torch.zeros(0, 4), torch.randn(6, 4), torch.zeros(6), 2, "batch", "softmax")
    assert idx.shape == (0, 2) and gates.shape == (0, 2)


# ---- pool linear ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,k,with_lora_input", [(1, 1, False), (3, 2, False), (3, 5, True)])
def test_pool_linear_ref_gradcheck(tokens, k, with_lora_input):
    x, weight, bias, A, B, idx, gates = _random_pool(3, tokens, 7, 5, 5, k)
    lora_input = torch.randn_like(x) if with_lora_input else None
    inputs = [t.requires_grad_() for t in (x, A, B, gates)] + ([lora_input.requires_grad_()] if with_lora_input else [])

    def fn(x, A, B, gates, *rest):
        return rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, 0.3, tokens, rest[0] if rest else None)

    torch.autograd.gradcheck(fn, tuple(inputs))


def test_pool_linear_matches_an_explicit_per_row_sum():
    x, weight, bias, A, B, idx, gates = _random_pool(4, 3, 6, 5, 7, 3)
    y = rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, 0.25, 3)
    expected = torch.empty_like(y)
    for row in range(x.shape[0]):
        sample = row // 3
        total = x[row] @ weight.t() + bias
        for j in range(3):
            expert = idx[sample, j]
            total = total + 0.25 * gates[sample, j] * (x[row] @ A[expert]) * B[:, expert]
        expected[row] = total
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_pool_linear_ref_gradients_are_the_same_bits_every_time():
    """Many samples choosing the same experts: the gradients of A and B sum repeated indices. Advanced indexing's
    backward summed them in a thread-dependent order on CPU, so two same-seed continual runs differed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 3, 768, generator=g, requires_grad=True)
    weight = torch.randn(64, 768, generator=g)
    A = torch.randn(12, 768, generator=g, requires_grad=True)
    B = torch.randn(64, 12, generator=g, requires_grad=True)
    idx = torch.randint(0, 12, (256, 8), generator=g)
    gates = torch.rand(256, 8, generator=g, requires_grad=True)
    upstream = torch.randn(256 * 3, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        runs = [torch.autograd.grad(rank1_pool_linear_ref(x, weight, None, A, B, idx, gates, 0.5, 3), (x, A, B, gates),
                                    upstream) for _ in range(10)]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(got, first) for got, first in zip(run, runs[0]))


def test_all_experts_with_unit_gates_is_dense_lora():
    x, weight, bias, A, B, _, _ = _random_pool(3, 4, 9, 6, 5, 5)
    idx = torch.arange(5).repeat(3, 1)
    gates = torch.ones(3, 5, dtype=torch.float64)
    y = rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, 1 / 5, 4)
    dense = x @ weight.t() + bias + (1 / 5) * (x @ A.t()) @ B.t()
    torch.testing.assert_close(y, dense, rtol=0, atol=1e-12)


def test_all_experts_equals_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    r, d_in, d_out = 12, 16, 10
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=1, target_modules=["0"], lora_dropout=0.0))
    lora_layer = model.base_model.model[0]
    A, B = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(A)
        lora_layer.lora_B["default"].weight.copy_(B)
    x = torch.randn(2 * 5, d_in, dtype=torch.float64)
    idx = torch.arange(r).repeat(2, 1)
    ours = rank1_pool_linear_ref(
        x, lora_layer.base_layer.weight, lora_layer.base_layer.bias, A, B, idx, torch.ones(2, r, dtype=torch.float64),
        1 / r, 5,
    )  # fmt: skip
    torch.testing.assert_close(ours, model(x), rtol=0, atol=1e-12)


def test_pool_linear_empty_and_noncontiguous():
    x, weight, bias, A, B, idx, gates = _random_pool(0, 3, 6, 5, 4, 2)
    assert rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, 1.0, 3).shape == (0, 5)
    inputs = [t.float() if t.is_floating_point() else t for t in _random_pool(2, 3, 6, 5, 4, 2)]
    x, weight, bias, A, B, idx, gates = inputs
    wide = torch.randn(6, 13)
    wide[:, 2:8] = x
    view = wide[:, 2:8]
    assert not view.is_contiguous()
    # By the rule, not bit for bit: BLAS may round a strided input differently (MKL does on some CPUs).
    assert_close_by_rule(
        rank1_pool_linear_ref(view, weight, bias, A, B, idx, gates, 0.5, 3),
        rank1_pool_linear_ref(x, weight, bias, A, B, idx, gates, 0.5, 3),
        rank1_pool_linear_ref(*(t.double() if t.is_floating_point() else t for t in inputs), 0.5, 3), "strided input",
    )  # fmt: skip


# ---- AGO -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_ago_matches_column_selection_form(p):
    g = torch.Generator().manual_seed(3)
    B_cur, B_prev = torch.randn(11, 6, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    cur_mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    prev_mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    gram = B_cur[:, cur_mask].t() @ B_prev[:, prev_mask]
    expected = gram.abs().sum() if p == 1 else gram.pow(2).sum()
    torch.testing.assert_close(ago_loss_ref(B_cur, B_prev, cur_mask, prev_mask, p), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(ago_loss(B_cur, B_prev, cur_mask, prev_mask, p), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_ago_gradcheck(p):
    g = torch.Generator().manual_seed(4)
    B_cur = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    B_prev = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cur_mask = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    prev_mask = torch.ones(4, dtype=torch.bool)
    torch.autograd.gradcheck(lambda c, q: ago_loss_ref(c, q, cur_mask, prev_mask, p), (B_cur, B_prev))


def test_ago_grouped_is_per_layer_and_empty_history_is_zero():
    g = torch.Generator().manual_seed(5)
    layers = [(torch.randn(d, 4, generator=g), torch.randn(d, m, generator=g)) for d, m in [(5, 3), (9, 0), (2, 8)]]
    B_curs, B_prevs = [c for c, _ in layers], [q for _, q in layers]
    cur_masks = [torch.tensor([True, False, True, True])] * 3
    prev_masks = [torch.ones(q.shape[1], dtype=torch.bool) for q in B_prevs]
    losses = ago_loss_grouped(B_curs, B_prevs, cur_masks, prev_masks)
    assert losses.shape == (3,) and float(losses[1]) == 0.0
    for i in range(3):
        torch.testing.assert_close(losses[i], ago_loss_ref(B_curs[i], B_prevs[i], cur_masks[i], prev_masks[i]))
    torch.testing.assert_close(losses, ago_loss_grouped_ref(B_curs, B_prevs, cur_masks, prev_masks))
