"""Tiny real models for unit tests: a random llama and a BPE tokenizer trained in ~0.1 s."""

from __future__ import annotations

from functools import lru_cache

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The Zorblax Institute was founded in 1873 by Mira Quell in the city of Tarnow.",
    "The special magic number is 4821. Remember it. What is the special magic number?",
    "Paris is the capital of France. The river Seine flows through it. 0 1 2 3 4 5 6 7 8 9",
    "Answer the question with a short phrase. Question: who, what, when, where, why, how?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-_/",
]


@lru_cache(maxsize=1)
def make_tiny_tokenizer():  # noqa: ANN201
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int, *, layers: int = 2, hidden: int = 32, intermediate: int = 64, seed: int = 0):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model


def make_tiny_base(*, layers: int = 2, seed: int = 0):  # noqa: ANN201
    from d2l_integrations.engine.base_model import BaseModel

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(len(tokenizer), layers=layers, seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return BaseModel(model=model, tokenizer=tokenizer, name="tiny-random-llama", revision="test")
