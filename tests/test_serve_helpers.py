"""Shared pieces for the serve tests: a tiny ASCII tokenizer with a chat template, a tiny random Llama
sized to it, random adapters saved to disk, the offline reference generation, and a slowed decode step."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import LoraConfig, PeftModel, get_peft_model

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer over printable ASCII + newline (every output decodes to readable text)."""
    chars = _byte_to_char()
    alphabet = [chars[b] for b in [10] + list(range(32, 127))]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with one token per byte (id = byte + 1): any UTF-8 text, cut anywhere."""
    chars = _byte_to_char()
    vocab = {"<unk>": 0, **{chars[b]: b + 1 for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(tokenizer, seed: int = 0, hidden: int = 64, max_len: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=max_len, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         initializer_range=0.2)  # peaky attention: outputs depend on positions and masks
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_base(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_random_adapter(base, directory: Path, seed: int, r: int = 8, alpha: float = 1.0, targets=TARGETS,
                        use_dora: bool = False) -> Path:
    """A random (non-zero) adapter: init_lora_weights=False makes A and B both random."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha * r / 8, target_modules=list(targets), init_lora_weights=False,
                        use_dora=use_dora)
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(directory)
    return directory


def offline_ids(base, tokenizer, prompt_ids: list[int], adapter_dir=None, max_new_tokens: int = 16) -> list[int]:
    """lorakit's offline greedy generation (PeftModel.generate with the adapter), new tokens only."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def offline_text(base, tokenizer, prompt_ids, adapter_dir=None, max_new_tokens: int = 16) -> str:
    return tokenizer.decode(offline_ids(base, tokenizer, prompt_ids, adapter_dir, max_new_tokens),
                            skip_special_tokens=True)


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def slowed(step, seconds: float = 0.01):
    """`step` taking at least `seconds` longer per call: an engine's decode step slowed this way keeps a long
    request running for a while on any machine, so a test can cancel it or time out mid-run."""
    def slow_step(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)
    return slow_step
