"""Tiny real Hugging Face models built from configs (no hub access needed)."""

import pytest
import torch
import transformers

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "phi3": lambda: transformers.Phi3Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=1, eos_token_id=2),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0, dropout: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    if not dropout:  # deterministic comparisons: switch off the base model's own dropouts
        for field in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout"):
            if hasattr(config, field):
                setattr(config, field, 0.0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


class MLP(torch.nn.Module):
    """A plain (non-HF) module: two nn.Linear layers."""

    def __init__(self, d_in=8, hidden=16, d_out=4):
        super().__init__()
        self.up = torch.nn.Linear(d_in, hidden)
        self.down = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def token_batch(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def word_tokenizer(words):
    """A real transformers fast tokenizer (WordLevel, whitespace) built offline."""
    import tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=words[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])
