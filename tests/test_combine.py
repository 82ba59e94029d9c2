"""add_weighted_adapter: linear, cat and svd combinations."""

import pytest
import torch
from test_layers import mixed_model


# -- combining --------------------------------------------------------------------------------------
def test_add_weighted_adapter_cat_svd_linear():
    model = mixed_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "cat", combination_type="cat")
    expected = 0.7 * layer.delta_weight("a") - 0.4 * layer.delta_weight("b")
    assert torch.allclose(layer.delta_weight("cat"), expected, atol=1e-5)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=3)
    best = torch.linalg.svd(expected)
    approx = best.U[:, :3] @ torch.diag(best.S[:3]) @ best.Vh[:3]
    assert torch.allclose(layer.delta_weight("svd"), approx, atol=1e-5)
    # linear mixes the factors: A = sum sqrt(w s) A_i, B likewise, so two halves of sqrt give back a
    model.add_weighted_adapter(["a", "a"], [0.25, 0.25], "lin", combination_type="linear")
    assert torch.allclose(layer.delta_weight("lin"), layer.delta_weight("a"), atol=1e-5)
    with pytest.raises(ValueError, match="equal rank"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "bad", combination_type="linear")
    with pytest.raises(ValueError, match="choose one of"):
        model.add_weighted_adapter(["a"], [1], "bad2", combination_type="ties")


