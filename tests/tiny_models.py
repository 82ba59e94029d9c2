"""Tiny random models and data shared by the tests (no downloads, built from configs)."""

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.lin0 = nn.Linear(32, 64)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, input_ids):
        return self.head(self.lin1(self.relu(self.lin0(self.emb(input_ids)))))


def tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


class ScaledEmbeddingMLP(MLP):
    """MLP whose embedding multiplies its output by embed_scale, as Gemma 3's does."""

    def __init__(self):
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

        self.emb = Gemma3TextScaledWordEmbedding(VOCAB, 32, padding_idx=0, embed_scale=32 ** 0.5)


def tiny_scaled_embedding_mlp(seed: int = 0) -> ScaledEmbeddingMLP:
    torch.manual_seed(seed)
    return ScaledEmbeddingMLP().eval()


def token_batch(batch: int = 3, seq: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def outputs(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(input_ids=ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def train_steps(model, optimizer, steps: int, **inputs) -> list[float]:
    """`steps` optimizer steps on the same batch (model(**inputs).loss); the loss of each."""
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def save_tiny_chat_base(directory) -> str:
    """A tiny random Llama (2 layers, hidden 32) with SmolLM2's tokenizer and chat template, saved to `directory`.

    The weights are large (initializer_range=0.3) so that a little LoRA visibly moves the loss.
    """
    from lorakit.models import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(directory)
    load_tokenizer("smollm2").save_pretrained(directory)
    return str(directory)


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from a second thread, and a waiting OpenMP team is slow on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CODE_WORDS = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jade", "kelp",
              "lumen"]


def write_code_pairs(path, rows: int) -> str:
    """`rows` (query, response) pairs about made-up codes, of varying length, as JSONL at `path`."""
    pairs = [{"query": f"What does code {i} mean{'?' * (1 + i % 3)}",
              "response": f"Code {i} means {CODE_WORDS[i % 12]}" + " and more" * (i % 4) + "."} for i in range(rows)]
    Path(path).write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return str(path)


def tiny_train_config(tiny_base: str, data_file: str, out, lora: dict | None = None, **changes):
    """A TrainConfig that trains a tiny base in well under a second (LoRA r=4, one epoch, no dropout); `lora`
    changes the adapter's LoraConfig fields, `changes` the run's settings."""
    from lorakit.train import TrainConfig, lora_recipe

    settings = dict(base=tiny_base, data=data_file, out=str(out), batch_size=4, epochs=1, lr=5e-3, progress=False)
    adapter = lora_recipe(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **(lora or {})})
    return TrainConfig(lora=adapter, **{**settings, **changes})
