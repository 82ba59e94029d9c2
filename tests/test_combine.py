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




def test_svd_keeps_the_largest_rank_where_rank_pattern_lowers_it():
    # v_proj has rank 2 in both adapters, so their sum has rank up to 4 = the adapters' largest rank:
    # the svd combination keeps it exactly there, as PEFT's does.
    from tiny_models import tiny_llama

    from lorakit import LoraConfig, get_peft_model

    config = dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False)
    model = get_peft_model(tiny_llama(), LoraConfig(**config))
    torch.manual_seed(1)
    model.add_adapter("b", LoraConfig(**config))
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "svd", combination_type="svd")
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    expected = 0.5 * layer.delta_weight("default") + 0.5 * layer.delta_weight("b")
    assert layer.r["svd"] == 4
    assert torch.allclose(layer.delta_weight("svd"), expected, atol=1e-5)


def test_modules_trained_whole_are_kept_or_refused():
    from tiny_models import outputs, tiny_llama, token_batch

    from lorakit import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # a trained head
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "both", combination_type="cat")
    # one adapter trains the head: the combination takes that trained head, not a fresh copy
    assert torch.equal(head.modules_to_save["both"].weight, head.modules_to_save["default"].weight)
    model.set_adapter("both")
    assert not torch.allclose(outputs(model, token_batch()), outputs(tiny_llama(), token_batch()))
    model.add_adapter("other_head", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="several of these adapters train whole.*lm_head"):
        model.add_weighted_adapter(["default", "other_head"], [0.5, 0.5], "x", combination_type="cat")
