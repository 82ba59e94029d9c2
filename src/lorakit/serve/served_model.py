"""The model the server runs: checked to be servable, called with one adapter per batch row, and given adapters
to load and unload (each on the base it was trained on)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch

from lorakit.adapter_folder import base_quantization
from lorakit.config import LoraConfig
from lorakit.errors import AdapterLoadError
from lorakit.model import PeftModel, get_peft_model, unwrapped

from .decode_step import DecodeStep
from .kv_cache import SlotCache


class ServedModel:
    """A base model (a PeftModel once it carries adapters) and its tokenizer, owned by the engine's thread."""

    def __init__(self, model, tokenizer, max_model_len: int, base_quantization: Optional[str] = None,
                 any_adapter_base: bool = False, fast_decode: bool = True):
        self.model = model
        self.base_quantization = base_quantization  # "nf4": NF4-rounded weights (as QLoRA trains); None: full
        self.any_adapter_base = any_adapter_base  # serve adapters trained on the other kind of base too
        hf = self.hf_model
        hf_config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        sliding = getattr(hf_config, "sliding_window", None)
        layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"} or (sliding and getattr(hf_config, "use_sliding_window", True)):
            raise ValueError(f"lorakit serve supports full-attention decoder models; {type(hf).__name__} uses "
                             f"sliding-window or non-attention layers ({sorted(layer_types)}).")
        limit = getattr(hf_config, "max_position_embeddings", None)
        if limit and max_model_len > limit:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit}).")
        # transformers 5 names the cache argument `cache`, earlier ones `past_key_values`
        self.cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        self.hf_config = hf.config
        self.eos_ids = _eos_ids(hf, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device = next(hf.parameters()).device
        # Decode steps of a Llama-family model skip the model's forward (see decode_step); False: always the forward
        self.fast_step = DecodeStep(hf) if fast_decode and DecodeStep.architecture_supported(hf) else None

    @property
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def hf_model(self):
        return unwrapped(self.model)

    def forward(self, names: list[Optional[str]], **kwargs):
        """One model call, row i with adapter names[i] (None: the base model)."""
        if not self.is_peft:
            return self.model(**kwargs)
        return self.model(adapter_names=names, **kwargs)

    def decode(self, names: list[Optional[str]], ids: torch.Tensor, positions: torch.Tensor,
               slots: SlotCache) -> torch.Tensor:
        """Next-token logits [n, vocab] of rows feeding ids[i] at positions[i] with adapter names[i]; their K/V go to
        their slots of `slots`."""
        slots.begin_step(positions)
        if self.fast_step is not None and self.fast_step.supports(names):
            return self.fast_step.step(ids, positions, names, slots)
        mask = torch.arange(int(positions.max()) + 1, device=ids.device)[None, :] <= positions[:, None]
        out = self.forward(names, input_ids=ids[:, None], position_ids=positions[:, None],
                           attention_mask=mask[:, None, None, :], use_cache=True, **{self.cache_kw: slots})
        return out.logits[:, -1, :]

    def load_adapter(self, name: str, path: Path) -> None:
        self._check_base(name, base_quantization([path]))
        if not self.is_peft:
            # Wrap the base with the adapter's own config, then drop the freshly initialised copy and
            # load through load_adapter, which cleans up after itself if the file does not fit.
            wrapped = get_peft_model(self.model, LoraConfig.from_pretrained(str(path)), adapter_name=name)
            wrapped.delete_adapter(name)
            self.model = wrapped.eval()
        try:
            self.model.load_adapter(str(path), adapter_name=name)
        finally:
            self._adapters_changed()
        self.model.eval()

    def unload_adapter(self, name: str) -> None:
        try:
            self.model.delete_adapter(name)
        finally:
            self._adapters_changed()

    def _adapters_changed(self) -> None:
        if self.fast_step is not None:
            self.fast_step.adapters_changed()

    def _check_base(self, name: str, trained_on: Optional[str]) -> None:
        """Refuse an adapter trained on another base than the one served (unless --quantize chose it)."""
        served = self.base_quantization
        if trained_on == served or self.any_adapter_base:
            return
        kind = {None: "the full-precision base", "nf4": "an NF4-rounded base (QLoRA)"}
        fix = "--quantize nf4" if trained_on else "--quantize auto and no QLoRA --adapter"
        raise AdapterLoadError(f"adapter '{name}' was trained on {kind.get(trained_on, trained_on)}, and this server "
                               f"serves {kind.get(served, served)}: its answers would differ from the ones it was "
                               f"trained to give. Serve it from a server started with {fix} (or pass --quantize none "
                               "or nf4 to serve every adapter on that base).")


def _eos_ids(hf, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(hf, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids
