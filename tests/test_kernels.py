"""lorakit.kernels: the LoRA update, fused (training) and not (decoding), equals the plain composition."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels import lora_linear
from lorakit.layers import LoraLinear

ATOL = 1e-5


def reference(x, weight, bias, a, b, scaling, p, fan_in_fan_out=False):
    """The plain composition PEFT uses: base + B(A(dropout(x))) * scaling."""
    if fan_in_fan_out:
        base = x @ weight + bias if bias is not None else x @ weight
    else:
        base = F.linear(x, weight, bias)
    x_lora = F.dropout(x, p, training=True) if p > 0 else x
    return base + F.linear(F.linear(x_lora, a), b) * scaling


def leaves(*tensors, grad_flags):
    return [t.detach().clone().requires_grad_(g) if t is not None else None for t, g in zip(tensors, grad_flags)]


CASES = [  # (in, out, r, batch shape, bias, dropout, fan_in_fan_out, weight trainable)
    (16, 24, 4, (5,), True, 0.0, False, False),
    (16, 24, 4, (2, 7), False, 0.0, False, False),
    (33, 17, 1, (3, 4), True, 0.3, False, False),
    (64, 64, 16, (2, 9), False, 0.1, False, True),
    (20, 48, 8, (11,), True, 0.5, True, False),
    (20, 12, 3, (2, 3), True, 0.0, True, True),
]


def assert_lora_linear_matches_reference(tensors, grad_flags, scaling, p, fan_in_fan_out, grad_out, mask_seed):
    """lora_linear and the plain composition on copies of `tensors` (x, W, bias, A, B): the same output and grads."""
    results = []
    for fn in (lora_linear, reference):
        inputs = leaves(*tensors, grad_flags=grad_flags)
        torch.manual_seed(mask_seed)  # the same dropout mask for both
        out = fn(*inputs, scaling, p, fan_in_fan_out)
        out.backward(grad_out)
        results.append((out, [t.grad if t is not None else None for t in inputs]))
    (ours, our_grads), (ref, ref_grads) = results
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=ATOL, rtol=1e-5)
    for name, g1, g2 in zip("x w bias A B".split(), our_grads, ref_grads):
        assert (g1 is None) == (g2 is None), name
        if g1 is not None:
            assert torch.allclose(g1, g2, atol=1e-4, rtol=1e-5), name
    return ours


@pytest.mark.parametrize("case", CASES)
def test_lora_linear_matches_reference(case):
    d_in, d_out, r, lead, with_bias, p, fan_in_fan_out, train_w = case
    torch.manual_seed(sum(lead) + r)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    x0, w0, a0, b0 = torch.randn(*lead, d_in), torch.randn(shape), torch.randn(r, d_in), torch.randn(d_out, r)
    bias0 = torch.randn(d_out) if with_bias else None
    grad_out = torch.randn(*lead, d_out)
    assert_lora_linear_matches_reference((x0, w0, bias0, a0, b0), (True, train_w, with_bias, True, True), 0.7, p,
                                         fan_in_fan_out, grad_out, mask_seed=123)


def random_case(seed: int):
    """A random LoRA-linear setting: shapes, rank, scaling, bias, dropout, layout and which inputs need a grad."""
    g = torch.Generator().manual_seed(seed)

    def pick(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=g))

    d_in, d_out, r = pick(1, 80), pick(1, 80), pick(1, 16)
    lead = tuple(pick(1, 6) for _ in range(pick(0, 3)))
    flags = torch.rand(6, generator=g) < 0.5
    dropout = 0.0 if flags[0] else round(float(torch.rand((), generator=g)) * 0.8 + 0.05, 3)
    scaling = round(float(torch.rand((), generator=g)) * 4, 3)
    # x needs no grad in a model's first adapted layer (its input comes from a frozen embedding); a base bias
    # trains with bias="all"/"lora_only" and stays frozen with "none".
    grads = (bool(flags[1]) or d_in % 3 != 0, bool(flags[2]), bool(flags[5]), True, True)
    return d_in, d_out, r, lead, bool(flags[3]), dropout, bool(flags[4]), scaling, grads


@pytest.mark.parametrize("seed", range(24))
def test_lora_linear_random_settings_match_reference(seed):
    d_in, d_out, r, lead, with_bias, p, fan_in_fan_out, scaling, grad_flags = random_case(seed)
    torch.manual_seed(seed)
    shape = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    tensors = (torch.randn(*lead, d_in), torch.randn(shape), torch.randn(d_out) if with_bias else None,
               torch.randn(r, d_in), torch.randn(d_out, r))
    grad_out = torch.randn(*lead, d_out)
    ours = assert_lora_linear_matches_reference(tensors, grad_flags, scaling, p, fan_in_fan_out, grad_out,
                                                mask_seed=1000 + seed)
    assert ours.shape == (*lead, d_out)


@pytest.mark.parametrize("lead", [(2, 5), (1, 1), (1,), ()])  # prefill, one decoded token, 2D, 1D
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_linear_without_autograd_matches_reference(lead, fan_in_fan_out):
    torch.manual_seed(0)
    x, bias, a, b = torch.randn(*lead, 16), torch.randn(8), torch.randn(4, 16), torch.randn(8, 4)
    w = torch.randn(16, 8) if fan_in_fan_out else torch.randn(8, 16)
    with torch.no_grad():
        ours = lora_linear(x, w, bias, a, b, 2.0, fan_in_fan_out=fan_in_fan_out)
        assert ours.grad_fn is None
    assert ours.shape == (*lead, 8)
    assert torch.allclose(ours, reference(x, w, bias, a, b, 2.0, 0.0, fan_in_fan_out), atol=ATOL)


def test_lora_linear_bf16_autocast_is_close():
    torch.manual_seed(0)
    x0, w0, a0, b0 = torch.randn(64, 32), torch.randn(48, 32) / 6, torch.randn(8, 32) / 6, torch.randn(48, 8) / 3
    outs, grads = [], []
    for fn in (lora_linear, reference):
        x, w, a, b = leaves(x0, w0, a0, b0, grad_flags=(True, False, True, True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, w, None, a, b, 2.0, 0.0)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        outs.append(out.float())
        grads.append((x.grad, a.grad, b.grad))
        assert a.grad.dtype == torch.float32  # gradients arrive in the parameters' own dtype
    assert torch.allclose(outs[0], outs[1], rtol=3e-2, atol=3e-2)
    for g1, g2 in zip(*grads):
        assert (g1 - g2).norm() / g2.norm() < 3e-2


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_layer_takes_fast_path_and_matches_reference(dropout, with_bias):
    torch.manual_seed(1)
    layer = LoraLinear(nn.Linear(24, 40, bias=with_bias))
    layer.add_adapter("default", r=6, alpha=12, scaling=2.0, dropout=dropout, init=False, use_dora=False)
    layer.active_adapters = ["default"]
    layer.base_layer.requires_grad_(False)
    if with_bias:  # bias="lora_only"/"all": the base bias trains
        layer.base_layer.bias.requires_grad_(True)
    layer.train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(9)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    out.pow(2).sum().backward()
    params = [p for p in layer.parameters() if p.requires_grad]
    ours = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    layer.zero_grad()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(9)
    ref = reference(x, layer.base_layer.weight, layer.base_layer.bias, A, B, 2.0, dropout)
    assert torch.allclose(out, ref, atol=ATOL)
    ref.pow(2).sum().backward()
    for g1, g2 in zip(ours, [x.grad] + [p.grad for p in params]):
        assert torch.allclose(g1, g2, atol=1e-4, rtol=1e-5)


def test_bf16_base_with_float32_adapter_takes_the_fast_path_with_the_update_in_float32():
    """No autocast, a bf16 base and float32 LoRA weights (get_peft_model's default): the fused function computes
    the update in float32, the adapter's dtype, sums it with the base output there and rounds once; gradients
    reach the float32 weights as float32."""
    torch.manual_seed(1)
    layer = LoraLinear(nn.Linear(48, 40).bfloat16())
    layer.add_adapter("default", r=6, alpha=12, scaling=2.0, dropout=0.0, init=False, use_dora=False)
    layer.active_adapters = ["default"]
    layer.base_layer.requires_grad_(False)
    layer.train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.float32
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "LoraLinearFunctionBackward"
    out.float().pow(2).sum().backward()
    assert A.grad.dtype == B.grad.dtype == torch.float32
    ours = [x.grad.float(), A.grad.clone(), B.grad.clone()]
    x.grad = A.grad = B.grad = None
    ref = reference(x.float(), layer.base_layer.weight.float(), layer.base_layer.bias.float(), A, B, 2.0, 0.0)
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    ref.pow(2).sum().backward()
    for ours_grad, ref_grad in zip(ours, [x.grad.float(), A.grad, B.grad]):
        assert (ours_grad - ref_grad).norm() <= 3e-2 * ref_grad.norm()
    with torch.no_grad():  # decoding takes the general path: the adapter in float32, as PEFT computes it
        assert (layer(x).float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def _stacked_case(dtype=torch.float32):
    """Three adapters (ranks 4, 2, 3) on three projections of 8, 4, 4 outputs reading a 16-wide input; adapter 1
    skips the second projection."""
    torch.manual_seed(0)
    from lorakit.kernels import LoraWeights

    sizes, ranks = [8, 4, 4], [4, 2, 3]
    projections = [[None if (p == 1 and i == 1) else
                    LoraWeights(torch.randn(r, 16), torch.randn(size, r), scaling=0.5 * (i + 1))
                    for i, r in enumerate(ranks)] for p, size in enumerate(sizes)]
    x = torch.randn(5, 16)
    base = torch.randn(5, sum(sizes), dtype=dtype)
    return projections, sizes, x, base


def _expected(projections, sizes, x, base, row_adapter):
    """Each row: its adapter's s x A^T B^T per projection, added to the base in float32, rounded once."""
    out = base.float().clone()
    start = 0
    for adapters, size in zip(projections, sizes):
        for i, adapter in enumerate(row_adapter):
            lora = adapters[adapter] if adapter >= 0 else None
            if lora is not None:
                out[i, start:start + size] += lora.scaling * (x[i] @ lora.a.T) @ lora.b.T
        start += size
    return out.to(base.dtype)


def test_stacked_lora_gives_each_row_its_own_adapters_update():
    from lorakit.kernels import add_stacked_lora, stack_lora

    projections, sizes, x, base = _stacked_case()
    stacked = stack_lora(projections, sizes)
    rows = [2, -1, 0, 1, 2]
    masks = {}
    got = add_stacked_lora(base.clone(), x, stacked, torch.tensor(rows), masks)
    torch.testing.assert_close(got, _expected(projections, sizes, x, base, rows), atol=1e-5, rtol=1e-5)
    assert list(masks) == [stacked.owners]  # the row mask is kept for the step's other layers
    # one adapter alone: its B's in one block-diagonal matrix, one matmul for the three projections
    alone = stack_lora([[adapters[0]] for adapters in projections], sizes)
    assert len(alone.parts) == 1 and alone.parts[0][:2] == (None, None)
    got = add_stacked_lora(base.clone(), x, alone, None)
    torch.testing.assert_close(got, _expected(projections, sizes, x, base, [0] * 5), atol=1e-5, rtol=1e-5)
    assert stack_lora([[None], [None], [None]], sizes) is None


def test_stacked_lora_on_a_bf16_base_sums_in_the_adapters_dtype_and_rounds_once():
    from lorakit.kernels import add_stacked_lora, stack_lora

    projections, sizes, x, base = _stacked_case(torch.bfloat16)
    rows = [0, 1, 2, -1, 0]
    got = add_stacked_lora(base.clone(), x, stack_lora(projections, sizes), torch.tensor(rows))
    assert got.dtype == torch.bfloat16
    expected = _expected(projections, sizes, x, base, rows)
    # one rounding of the float32 sum: at most half a bf16 step off (float32 summation order aside)
    assert ((got.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -8 + 1e-6).all()
