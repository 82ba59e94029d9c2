"""Batched chat generation: left-padded prompts, greedy or sampled, stopping at the end-of-turn token."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, <|im_end|> if known, the model's eos."""
    ids = []
    candidates = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if model is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        candidates += eos if isinstance(eos, list) else [eos]
    for i in candidates:
        if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation followed by the assistant header, as training renders it."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with padding on the left, so every row ends where generation starts."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(list(r))
            attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    adapter_names: Optional[Sequence[Optional[str]]] = None,
    progress: bool = False,
) -> list[str]:
    """Reply to each conversation; temperature 0 is greedy. Returns the decoded replies in input order."""
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    # Similar lengths in a batch mean less padding; results are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    from tqdm.auto import tqdm

    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in chunk], pad)
        kwargs = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = [adapter_names[i] for i in chunk]
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **sampling,
                             **kwargs)
        for row, i in enumerate(chunk):
            new = out[row, input_ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            replies[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    model.train(was_training)
    return replies
