"""A tiny random Llama wrapped in a real ``D2LEngine``, plus a toy hypernetwork, for CPU unit tests.

Shared by tests/unit/{routing,langchain,llama_index} (``from tests.unit.routing.tiny_engine import ...``).
Everything is built in memory: a byte-level BPE tokenizer trained on a few sentences, a 2-layer
Llama with random weights, and ``ToyHypernetwork``, an ``Internalizer`` that maps a chunk's sha256
to seeded random LoRA factors (so equal text gives equal adapters, different text different ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights

TINY_MODEL_NAME = "tiny-random-llama"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The Zorblax Institute was founded in 1873 by Mira Quell in the town of Vell.",
    "Question: who founded it? Answer: a person. Context: documents, facts, numbers 0123456789.",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX. hello world, how are you?",
]


def tiny_tokenizer() -> object:
    """A byte-level BPE tokenizer (~400 tokens) with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_base_model(seed: int = 0) -> BaseModel:
    """A 2-layer Llama (hidden 32) with random weights, float32, on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return BaseModel(model=model, tokenizer=tokenizer, name=TINY_MODEL_NAME, revision=f"tiny-seed-{seed}")


class ToyHypernetwork:
    """An ``Internalizer``: chunk text -> seeded random rank-4 LoRA on every ``mlp.down_proj``.

    Not a trained model: the factors are a deterministic function of the text's sha256, which is
    exactly what adapter-isolation tests need (different text, different outputs).
    """

    name = "hypernetwork"
    checkpoint_id = "toy-hypernetwork-v1"
    prefer_over_distill = True  # so method="auto" (what KnowledgeBase uses by default) picks it

    def __init__(self, rank: int = 4, scaling: float = 4.0) -> None:
        self.rank = rank
        self.scaling = scaling

    def internalize_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        adapters = []
        for i, chunk in enumerate(chunks):
            sha = hashlib.sha256(chunk.encode("utf-8")).hexdigest()
            adapters.append(toy_adapter(base, sha, rank=self.rank, scaling=self.scaling,
                                        chunk_id=chunk_ids[i] if chunk_ids else None, checkpoint_id=self.checkpoint_id))
            if progress is not None:
                progress(i + 1, len(chunks))
        return adapters


def toy_adapter(
    base: BaseModel, sha: str, *, rank: int = 4, scaling: float = 4.0, chunk_id: str | None = None,
    checkpoint_id: str | None = "toy-hypernetwork-v1",
) -> LoRAAdapter:
    """Seeded random factors for every layer's ``mlp.down_proj``; the seed is ``sha``."""
    generator = torch.Generator().manual_seed(int(sha[:15], 16))
    weights = {}
    for layer in range(base.num_layers):
        path = base.module_path(layer, "down_proj")
        lin = base.model.get_submodule(path)
        lora_A = torch.randn(rank, lin.in_features, generator=generator) / lin.in_features**0.5
        lora_B = torch.randn(lin.out_features, rank, generator=generator) / rank**0.5
        weights[path] = LoRAWeights(lora_A, lora_B, scaling)
    provenance = AdapterProvenance(
        base_model=base.name, base_model_revision=base.revision, checkpoint_id=checkpoint_id,
        method="hypernetwork", source_sha256=(sha,), chunk_ids=(chunk_id,) if chunk_id else (),
    )
    return LoRAAdapter(weights, provenance)


def tiny_engine(seed: int = 0) -> D2LEngine:
    """A real ``D2LEngine`` over the tiny random Llama, with the toy hypernetwork loaded."""
    return D2LEngine(tiny_base_model(seed), ToyHypernetwork())
