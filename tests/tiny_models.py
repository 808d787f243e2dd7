"""The one test double of the expensive model: a tiny random llama, a BPE tokenizer trained in ~0.1 s,
and ``SeededInternalizer``, an internalizer whose adapter is a pure function of the chunk text.

    base = make_tiny_base()                       # BaseModel: 2-layer random llama, ChatML template
    engine = tiny_engine()                        # a real D2LEngine over it, SeededInternalizer loaded
    engine.hypernetwork.calls                     # sha256 of every chunk internalized so far

Shared by every unit-test package (engine, knowledge, routing, langchain, llama_index, benchmarks)
and by the knowledge-base worker processes (``tests/unit/knowledge/kb_worker.py``). Everything is
built in memory, offline and deterministically, so two processes build identical engines.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

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
    "The Zorblax Institute was founded in 1873 by Mira Quell in the city of Tarnow.",
    "The special magic number is 4821. Remember it. What is the special magic number?",
    "Paris is the capital of France. The river Seine flows through it. 0 1 2 3 4 5 6 7 8 9",
    "Answer the question with a short phrase. Question: who, what, when, where, why, how?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-_/",
]


@lru_cache(maxsize=1)
def make_tiny_tokenizer():  # noqa: ANN201
    """A byte-level BPE tokenizer (400 tokens) with a ChatML chat template, trained offline."""
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


def make_tiny_llama(  # noqa: ANN201
    vocab_size: int, *, layers: int = 2, hidden: int = 32, intermediate: int = 64, seed: int = 0, max_positions: int = 512
):
    """A ``LlamaForCausalLM`` with random weights (seeded), float32, eval mode, no gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model


def make_tiny_base(*, layers: int = 2, seed: int = 0, max_positions: int = 512, name: str = TINY_MODEL_NAME) -> BaseModel:
    """The tiny llama and tokenizer as a ``BaseModel``; its revision names the weight seed (``tiny-seed-0``)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(len(tokenizer), layers=layers, seed=seed, max_positions=max_positions)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return BaseModel(model=model, tokenizer=tokenizer, name=name, revision=f"tiny-seed-{seed}")


class SeededInternalizer:
    """An ``Internalizer`` (stand-in for the trained hypernetwork): chunk text -> seeded random LoRA.

    Each chunk gets rank-``rank`` factors on every ``mlp.down_proj``, seeded by the chunk's sha256
    (equal text, equal adapter, exactly; different text, different outputs), plus one fixed rank-1
    bias LoRA, like the real hypernetwork's, so composition must add the bias once. It records the
    sha256 of every chunk it internalizes in ``calls`` (and appends it to the file named by
    ``$D2L_TEST_INTERNALIZE_LOG``, so counts survive worker processes) and can sleep ``delay_s``
    per chunk, so tests can kill a process in the middle of an ``add``.

    Args:
        checkpoint_id: keys the adapter store (change it to simulate another checkpoint).
        rank: rank of each chunk's factors.
        scaling: LoRA scaling of each chunk's factors.
        delay_s: seconds to sleep per chunk.
    """

    name = "hypernetwork"
    prefer_over_distill = True  # so method="auto" (the KnowledgeBase default) picks it

    def __init__(self, checkpoint_id: str = "seeded-test-v1", *, rank: int = 4, scaling: float = 4.0, delay_s: float = 0.0) -> None:
        self.checkpoint_id = checkpoint_id
        self.rank = rank
        self.scaling = scaling
        self.delay_s = delay_s
        self.calls: list[str] = []

    def internalize_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        log = os.environ.get("D2L_TEST_INTERNALIZE_LOG")
        bias = bias_lora(base)
        adapters = []
        for i, text in enumerate(chunks):
            if self.delay_s:
                time.sleep(self.delay_s)
            sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
            self.calls.append(sha)
            if log:
                with open(log, "a") as fh:
                    fh.write(sha + "\n")
            provenance = AdapterProvenance(
                base_model=base.name, base_model_revision=base.revision, checkpoint_id=self.checkpoint_id,
                method=self.name, source_sha256=(sha,), chunk_ids=(chunk_ids[i],) if chunk_ids else (),
            )
            weights = seeded_factors(base, int(sha[:15], 16), rank=self.rank, scaling=self.scaling)
            adapters.append(LoRAAdapter(weights, provenance, bias))
            if progress is not None:
                progress(i + 1, len(chunks))
        return adapters


def seeded_factors(base: BaseModel, seed: int, *, rank: int = 4, scaling: float = 4.0) -> dict[str, LoRAWeights]:
    """Random ``lora_A`` (rank x in) and ``lora_B`` (out x rank) for every layer's ``mlp.down_proj``.

    Scaled by 1/sqrt(fan-in), so with ``scaling=4`` an adapter visibly changes the tiny model's output.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(base.num_layers):
        path = base.module_path(layer, "down_proj")
        lin = base.model.get_submodule(path)
        lora_A = torch.randn(rank, lin.in_features, generator=generator) / lin.in_features**0.5
        lora_B = torch.randn(lin.out_features, rank, generator=generator) / rank**0.5
        weights[path] = LoRAWeights(lora_A, lora_B, scaling)
    return weights


def bias_lora(base: BaseModel) -> dict[str, LoRAWeights]:
    """The fixed, small rank-1 bias LoRA every ``SeededInternalizer`` adapter carries."""
    return {name: LoRAWeights(w.lora_A * 0.1, w.lora_B * 0.1, 1.0) for name, w in seeded_factors(base, 0, rank=1).items()}


def tiny_engine(
    seed: int = 0,
    *,
    base: BaseModel | None = None,
    base_name: str | None = None,
    checkpoint_id: str = "seeded-test-v1",
    delay_s: float = 0.0,
) -> D2LEngine:
    """A real ``D2LEngine`` with ``SeededInternalizer`` loaded as its hypernetwork.

    Args:
        seed: weight seed of a new tiny base (1024 positions); ignored when ``base`` is given.
        base: reuse this base model (e.g. the session's ``tiny_base`` fixture).
        base_name: rename the base (same weights) to simulate another base model.
        checkpoint_id / delay_s: see ``SeededInternalizer``.
    """
    base = base or make_tiny_base(seed=seed, max_positions=1024)
    if base_name is not None:
        base = BaseModel(model=base.model, tokenizer=base.tokenizer, name=base_name, revision=base.revision)
    return D2LEngine(base, SeededInternalizer(checkpoint_id, delay_s=delay_s))
