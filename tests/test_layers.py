"""LoRA layers: dropout, initialisation, mixed-adapter batches."""

import copy
import gc
import pickle
import weakref

import peft
import pytest
import torch
from test_model import ATOL, build_pair
from tiny_models import outputs, tiny_llama, token_batch

import lorakit
from lorakit import LoraConfig, get_peft_model


def test_training_mode_dropout_only_touches_lora_input():
    theirs, ours = build_pair("llama", {}, lora_dropout=0.5)
    ours.train()
    ids = token_batch()
    with ours.disable_adapter():
        base = outputs(ours, ids)
    torch.manual_seed(0)
    a = outputs(ours, ids)
    torch.manual_seed(1)
    b = outputs(ours, ids)
    assert not torch.allclose(a, b)  # dropout is live on the LoRA path ...
    ours.eval()
    assert torch.allclose(outputs(ours, ids), outputs(theirs, ids), atol=ATOL)  # ... and off in eval
    assert not torch.allclose(base, outputs(ours, ids))


def test_pissa_matches_peft_and_starts_at_the_base_output():
    base = tiny_llama()
    ids = token_batch()
    reference = outputs(base, ids)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg)).eval()
    ours = get_peft_model(tiny_llama(), LoraConfig(**cfg)).eval()
    assert torch.allclose(outputs(ours, ids), reference, atol=1e-4)
    assert torch.allclose(outputs(ours, ids), outputs(theirs, ids), atol=ATOL)
    with ours.disable_adapter():  # the base now holds only the residual
        assert not torch.allclose(outputs(ours, ids), reference, atol=1e-3)


def test_gaussian_and_default_init():
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 4) < 0.05
    ids = token_batch()
    with ours.disable_adapter():
        base = outputs(ours, ids)
    assert torch.equal(outputs(ours, ids), base)


# -- mixed-adapter batches --------------------------------------------------------------------------
def mixed_model(dtype: torch.dtype = torch.float32):
    """Adapters a, b and c (DoRA) on a tiny Llama whose base weights are `dtype` (the adapters stay float32)."""
    model = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                     init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                      init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj", "embed_tokens"], use_dora=True,
                                      init_lora_weights=False))
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "lora_magnitude_vector") and "c" in mod.lora_magnitude_vector:
                mod.lora_magnitude_vector["c"].weight.mul_(1.3)
    return model.eval()


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = mixed_model()
    ids = token_batch(batch=5)
    names = ["a", "b", None, "c", "__base__"]
    mixed = outputs(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name in (None, "__base__"):
            with model.disable_adapter():
                single = outputs(model, ids[row:row + 1])
        else:
            model.set_adapter(name)
            single = outputs(model, ids[row:row + 1])
        assert torch.allclose(mixed[row], single[0], atol=ATOL), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [10, 1])  # a prompt, and one decoded token per row
@pytest.mark.parametrize("names", [["a", "b", None, "b", "a"], ["a", "b", None, "c", "a"]], ids=["lora", "dora"])
def test_mixed_batch_rows_equal_the_batch_run_with_their_adapter_bit_for_bit(dtype, tokens, names):
    """One rounding rule for every path: a row's logits in a mixed batch equal, to the bit, the logits of the
    same batch run with that row's adapter set for every row (and the plain base for a base row)."""
    model = mixed_model(dtype)
    ids = token_batch(batch=5, seq=tokens)
    with torch.no_grad():
        mixed = outputs(model, ids, adapter_names=names)
        alone = {}
        for name in dict.fromkeys(names):
            if name is None:
                with model.disable_adapter():
                    alone[name] = outputs(model, ids)
            else:
                model.set_adapter(name)
                alone[name] = outputs(model, ids)
    assert mixed.dtype == dtype and model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.dtype \
        == torch.float32
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], alone[name][row]), (name, (mixed[row] - alone[name][row]).abs().max())
    # the adapters really differ from each other and from the base, so the equalities mean something
    assert all(not torch.equal(alone[a][0], alone[b][0]) for a, b in zip(names, names[1:]) if a != b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_one_adapter_for_every_row_is_the_one_adapter_call(dtype, monkeypatch):
    """A server batch whose rows all want adapter b runs the path of set_adapter("b"): the same bits, and no
    per-row masking."""
    import lorakit.layers

    model = mixed_model(dtype)
    ids = token_batch(batch=4, seq=3)
    with torch.no_grad():
        model.set_adapter("b")
        alone = outputs(model, ids)
        model.set_adapter("a")  # the active adapter is another one
        monkeypatch.setattr(lorakit.layers, "add_lora_by_rows", lambda *a, **k: pytest.fail("took the mixed path"))
        together = outputs(model, ids, adapter_names=["b"] * 4)
    assert torch.equal(together, alone)


def test_mixed_batch_generate_equals_one_by_one():
    model = mixed_model()
    ids = token_batch(batch=3, seq=6)
    names = ["b", "a", "c"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        model.set_adapter(name)
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=torch.ones_like(ids[row:row + 1]), **kwargs)
        assert torch.equal(together[row], alone[0]), name


def test_mixed_batch_is_one_forward_not_a_loop():
    model = mixed_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    outputs(model, token_batch(batch=4), adapter_names=["a", "b", "a", None])
    assert len(calls) == 1


def test_mixed_batch_refused_while_merged():
    model = mixed_model()
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        outputs(model, token_batch(batch=2), adapter_names=["a", "b"])


def test_mixed_batch_unknown_adapter():
    with pytest.raises(lorakit.AdapterNotFoundError, match="'zz'.*loaded adapters: a, b, c"):
        outputs(mixed_model(), token_batch(batch=2), adapter_names=["a", "zz"])




class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10)

    def forward(self, x):
        return self.proj(x)


def test_a_forward_replaced_on_the_base_layer_is_called():
    """accelerate's offloading hooks replace the base layer's forward on the instance; the fast path must not
    skip it."""
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    base = model.base_model.model.proj.base_layer
    original, calls = base.forward, []

    def replaced(x):
        calls.append(x.shape)
        return original(x)

    base.forward = replaced
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        out = model(x)
    del base.forward
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-6)
    assert calls == [x.shape]


def test_copies_have_their_own_adapters_and_no_cycle_keeps_weights_alive():
    """A deep copy or an unpickled model runs its own adapters; deleting a model frees its weights at once, without
    the garbage collector (no reference cycle through the LoRA layers)."""
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(1, 1, 12)
    assert "(lora_A): ModuleDict(" in repr(model)  # printed as PEFT's model prints
    with torch.no_grad():
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            layer, twin_layer = model.base_model.model.proj, twin.base_model.model.proj
            before = model(x)
            assert torch.equal(twin(x), before)
            new_a = torch.nn.Linear(12, 2, bias=False)
            twin_layer.lora_A["default"] = new_a
            assert torch.equal(model(x), before)
            expected = layer.base_layer(x) + layer.scaling["default"] * new_a(x) @ layer.lora_B["default"].weight.T
            assert torch.allclose(twin(x), expected, atol=1e-6)

    weight = weakref.ref(model.base_model.model.proj.base_layer.weight)
    gc.disable()
    try:
        del model, twin, layer, twin_layer
        assert weight() is None
    finally:
        gc.enable()


def test_every_state_change_is_seen_at_once():
    """Which adapters run and with which weights: each change of adapter state is seen by the next forward."""
    torch.manual_seed(0)
    model = get_peft_model(_OneLinear(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                   init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    W, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()

    def expected(x, name=None):
        out = x @ W.T + bias
        if name is not None:
            out = out + layer.scaling[name] * (x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T)
        return out

    with torch.no_grad():
        for x in (torch.randn(1, 1, 12), torch.randn(2, 5, 12)):  # one decoded token, and a batch
            assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)
            model.set_adapter("b")
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            with model.disable_adapter():
                assert torch.allclose(model(x), expected(x), atol=1e-6)
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            model.merge_adapter()
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-5)  # the adapter is not added twice
            model.unmerge_adapter()
            assert torch.allclose(layer.base_layer.weight, W, atol=1e-6)
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            old_b = layer.lora_B["b"].weight
            layer.lora_B["b"].weight = torch.nn.Parameter(torch.randn_like(old_b))  # a new Parameter object
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            layer.lora_B["b"].weight = old_b
            old_a = layer.lora_A["b"]
            layer.lora_A["b"] = torch.nn.Linear(12, 3, bias=False)  # a new module in the adapter's dict
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            layer.lora_A.update({"b": old_a})
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6)
            calls = []
            handle = layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
            assert torch.allclose(model(x), expected(x, "b"), atol=1e-6) and calls == [1]
            handle.remove()
            model.set_adapter("default")

    x = torch.randn(2, 5, 12)
    model.train()
    assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)  # no dropout configured
    layer.lora_dropout["default"] = torch.nn.Dropout(0.0)  # dropout added later, at first off ...
    assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)
    layer.lora_dropout["default"].p = 0.9  # ... then on
    assert not torch.allclose(model(x), expected(x, "default"), atol=1e-3)
    model.eval()
    assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)

    class Silence(torch.nn.Module):  # a dropout of the user's own: called, not skipped
        def forward(self, x):
            return torch.zeros_like(x)

    layer.lora_dropout["default"] = Silence()
    assert torch.allclose(model(x), expected(x), atol=1e-6)
    layer.lora_dropout.pop("default")
    layer.lora_dropout["default"] = torch.nn.Identity()
    assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapters == ["default"]
    assert torch.allclose(model(x), expected(x, "default"), atol=1e-6)
