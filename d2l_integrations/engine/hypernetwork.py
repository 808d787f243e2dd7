"""The D2L hypernetwork: document features in, per-layer LoRA factors out.

Full definition of the Doc-to-LoRA hypernetwork (SakanaAI/doc-to-lora, Charakorn et al. 2026), all of it
in this file, in reading order: feature extraction from the frozen base model, the Perceiver
building blocks (``RMSNorm``, ``SwiGLU``, ``CrossAttention``, ``PerceiverLayer``, ``PerceiverStack``,
``Perceiver``), the per-layer residual MLP (``PerLayerLinear``, ``ResMLPBlockPerLayer``), the
``Hypernetwork`` itself, and ``HypernetworkInternalizer``, which turns text chunks into adapters.

Symbols used in shape comments::

    n    chunks in a batch          L   base-model layers (one LoRA per layer and module)
    T    context tokens             H   base hidden size
    M    target modules             r   LoRA rank per chunk
    D    latent size (Perceiver width)   d_lora = max over modules of d_in + d_out

Submodule names follow the reference checkpoint, so the importer in ``checkpoint.py`` is a
key-by-key copy with three documented exceptions (see ``checkpoint.sakana_to_ours``):
``aggregator.perceiver.`` becomes ``perceiver.``, the per-layer biases are stored ``[L, d]``
instead of the reference's broadcast ``[1, L, 1, 1, d]``, and ``head.weight`` always carries the
module axis, ``[L, M, D, d_lora]`` (the reference drops it when M == 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.internalizer import check_chunks
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights
from d2l_integrations.errors import (
    ConfigError,
    IncompatibleCheckpointError,
    InvalidDocumentError,
)

logger = logging.getLogger(__name__)

ModuleFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""module name -> (A ``[n, L, r, d_in]``, B ``[n, L, r, d_out]``), per chunk, before composition."""

LAYER_MIX_GAIN = 2.0
"""``config.layer_mix``: the mix is ``I + LAYER_MIX_GAIN * layer_mix_delta``. Adam moves a parameter by about the
learning rate a step whatever its gradient's size: at the trainer's 3e-4 an ungained entry moves at most ~0.2 in a
~1,500-step run, and a layer reads 30 others, so 2 lets a row reach a whole layer's worth of other layers. More
would also amplify the mix's random walk: its gradient's direction changes from batch to batch (session 24's probe),
and at 5 that walk alone was estimated at ~1/3 of a layer's own features."""

_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class ModulePathNaming(Protocol):
    """Anything that names a target module of a decoder layer (``BaseModel`` does)."""

    def module_path(self, layer: int, module: str) -> str: ...


def default_module_path(layer: int, module: str) -> str:
    """Llama/Mistral/Qwen naming: ``model.layers.{i}.self_attn.q_proj``, ``model.layers.{i}.mlp.down_proj``."""
    block = "self_attn" if module in _ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


# ----------------------------------------------------------------------------- feature extraction


def features_from_hidden_states(hidden_states: Sequence[torch.Tensor], final_norm: nn.Module) -> torch.Tensor:
    """Context features ``[n, L, T, H]`` from the ``L + 1`` hidden states of a full base forward.

    Entry ``l`` feeds the LoRA of layer ``l``: the embedding output, the outputs of layers
    ``0 .. L-2``, and for the last entry the final norm applied to the output of layer ``L-2``.
    This equals the reference, which runs the base with its last decoder layer removed; a trainer
    can call it on the hidden states of the teacher's own forward pass.

    Args:
        hidden_states: ``output_hidden_states=True`` output of the base, ``L + 1`` tensors ``[n, T, H]``.
        final_norm: the base model's final norm (``model.model.norm`` for Llama-style models).
    """
    num_layers = len(hidden_states) - 1
    if num_layers < 1:
        msg = f"Expected the L + 1 hidden states of a full forward pass, got {len(hidden_states)} tensor(s)."
        raise ValueError(msg)
    last = final_norm(hidden_states[num_layers - 1])
    return torch.stack([*hidden_states[: num_layers - 1], last], dim=1)  # (n, L, T, H)


def _hf_model(base_or_model: Any) -> nn.Module:
    model = getattr(base_or_model, "model", base_or_model)  # BaseModel -> its transformers model
    if not hasattr(model, "get_decoder"):
        msg = f"Expected a BaseModel or a transformers causal LM, got {type(base_or_model).__name__}."
        raise TypeError(msg)
    return model  # type: ignore[no-any-return]


def _final_norm(decoder: nn.Module) -> nn.Module:
    for name in ("norm", "final_layernorm", "ln_f"):
        norm = getattr(decoder, name, None)
        if isinstance(norm, nn.Module):
            return norm
    msg = f"Cannot find the final norm of {type(decoder).__name__} (looked for `norm`, `final_layernorm`, `ln_f`)."
    raise TypeError(msg)


def encode_context(base_or_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the frozen base once and return the D2L context features ``[n, L, T, H]``.

    One forward of the decoder stack (no LM head) with ``output_hidden_states=True``; adapters
    active in the caller's context are switched off, since the reference encodes with the plain
    base. Positions where ``attention_mask`` is 0 hold garbage and must stay masked downstream.

    Args:
        base_or_model: a ``BaseModel`` or a transformers causal LM (Llama/Mistral/Qwen style).
        input_ids: ``[n, T]`` right-padded token ids.
        attention_mask: ``[n, T]``, 1 on real tokens.
    """
    model = _hf_model(base_or_model)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    with use_adapters(model, None):
        out = decoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
    return features_from_hidden_states(out.hidden_states, _final_norm(decoder))


# ----------------------------------------------------------------------------- Perceiver


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``, computed in float32 (Idefics2 style)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases: the modality projection and Perceiver MLP."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(input_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(input_size, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, output_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """Latents attend to a context (keys/values from the context only), grouped-query heads.

    Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``. Context positions
    whose mask is False get no attention weight, so padding never changes the result.
    """

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d = config.latent_size
        self.q_proj = nn.Linear(d, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        B, Q, _ = latents.shape
        T = context.shape[1]
        q = self.q_proj(latents).view(B, Q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, Q, hd)
        k = self.k_proj(context).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(context).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, nh, T, hd): head h uses kv head h // group
        v = v.repeat_interleave(group, dim=1)
        # fused attention: the (B, nh, Q, T) scores are never stored (B = chunks x layers: ~2,000 rows at batch 64)
        mask = context_mask[:, None, None, :] if context_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)  # (B, nh, Q, hd)
        out = out.transpose(1, 2).reshape(B, Q, self.num_heads * self.head_dim)  # (B, Q, nh*hd)
        return self.o_proj(out)  # type: ignore[no-any-return]


class PerceiverLayer(nn.Module):
    """One cross-attention block with RMSNorms on the inputs and on both residual branches."""

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        d, eps = config.latent_size, config.rms_norm_eps
        self.input_latents_layernorm = RMSNorm(d, eps)
        self.input_context_layernorm = RMSNorm(d, eps)
        self.self_attn = CrossAttention(config)  # the reference's name, though it is cross-attention
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_ff_layernorm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, config.mlp_factor * d, d)
        self.post_ff_layernorm = RMSNorm(d, eps)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.self_attn(self.input_latents_layernorm(latents), self.input_context_layernorm(context), context_mask)
        latents = latents + self.post_attention_layernorm(attended)
        return latents + self.post_ff_layernorm(self.mlp(self.pre_ff_layernorm(latents)))  # type: ignore[no-any-return]


class PerceiverStack(nn.Module):
    """Learned latent queries refined by ``num_blocks`` cross-attention blocks, then a final RMSNorm."""

    def __init__(self, config: HypernetworkConfig, *, num_latents: int, num_blocks: int) -> None:
        super().__init__()
        # random, not constant: identical queries would stay identical (every rank the same) forever
        self.latents_q = nn.Parameter(torch.randn(num_latents, config.latent_size))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(num_blocks))
        self.layernorm = RMSNorm(config.latent_size, config.rms_norm_eps)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        latents = self.latents_q.to(context.dtype).expand(context.shape[0], -1, -1)  # (B, Nq, D)
        for layer in self.layers:
            latents = layer(latents, context, context_mask)
        return self.layernorm(latents)  # type: ignore[no-any-return]


class Perceiver(nn.Module):
    """Shared across layers: one (chunk, layer) feature sequence in, ``M * r`` latent vectors out.

    The encoder compresses the projected context into ``num_latents`` latents; the decoder's
    ``M * r`` queries (module-major: query ``m * r + i`` is rank ``i`` of module ``m``) read them.
    """

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        H, D = config.hidden_size, config.latent_size
        self.modality_projection = SwiGLU(H, config.projection_factor * H, D)
        self.encoder = PerceiverStack(config, num_latents=config.num_latents, num_blocks=config.num_blocks)
        num_queries = len(config.module_dims) * config.rank
        self.decoder = PerceiverStack(config, num_latents=num_queries, num_blocks=1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        context = self.modality_projection(features)  # (B, T, D)
        latents = self.encoder(context, mask)  # (B, num_latents, D)
        return self.decoder(latents, None)  # type: ignore[no-any-return]  # (B, M*r, D)


# ----------------------------------------------------------------------------- per-layer MLP


class PerLayerLinear(nn.Module):
    """A linear map with its own ``[d_in, d_out]`` weight and ``[d_out]`` bias per base layer.

    Acts on ``[n, L, M, r, d_in]`` (the reference's einops ``EinMix``; its bias is stored
    ``[1, L, 1, 1, d_out]``, ours ``[L, d_out]``).
    """

    def __init__(self, num_layers: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_layers, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_layers, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nlmri,lio->nlmro", x, self.weight) + self.bias[None, :, None, None, :]


class ResMLPBlockPerLayer(nn.Module):
    """``z + LN(W2_l silu(W1_l LN(z)))`` with per-layer weights; indices 0..4 match the checkpoint."""

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        L, D, eps = config.num_layers, config.latent_size, config.layer_norm_eps
        self.layers = nn.Sequential(
            nn.LayerNorm(D, eps=eps),
            PerLayerLinear(L, D, config.resmlp_factor * D),
            nn.SiLU(),
            PerLayerLinear(L, config.resmlp_factor * D, D),
            nn.LayerNorm(D, eps=eps),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.layers(z)  # type: ignore[no-any-return]


class PerLayerHead(nn.Module):
    """Maps each (layer, module) latent to a flat ``A | B`` row: weight ``[L, M, D, d_lora]``, no bias."""

    def __init__(self, num_layers: int, num_modules: int, latent_size: int, d_lora: int, *, rank: int) -> None:
        super().__init__()
        std = 0.5 / math.sqrt(latent_size + d_lora * rank)  # the reference's init scale
        self.weight = nn.Parameter(torch.randn(num_layers, num_modules, latent_size, d_lora) * std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nlmrd,lmde->nlmre", z, self.weight)  # (n, L, M, r, d_lora)


# ----------------------------------------------------------------------------- the hypernetwork


class Hypernetwork(nn.Module):
    """D2L hypernetwork: context features of a chunk -> one rank-``r`` LoRA per layer and module.

    Pipeline (shapes for n chunks)::

        features [n, L, T, H] -> Perceiver per (chunk, layer)   -> [n, L, M, r, D]   (aggregate)
        -> ResMLP per layer -> z / ||z||_2 -> head per layer    -> [n, L, M, r, d_lora] (project)
        -> split into A | B, times per-layer per-rank scalers   -> {module: (A, B)}  (split)

    ``delta_W = lora_alpha * B^T @ A`` per layer (alpha applied directly, not alpha / r), plus the
    document-independent bias LoRA (``bias_A``/``bias_B``), applied once however many chunks.

    Example:
        >>> net = Hypernetwork(config)
        >>> factors = net(encode_context(base, ids, mask), mask)
        >>> adapters = net.to_adapters(factors, base, provenance)
    """

    def __init__(self, config: HypernetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_id: str | None = None
        """Set by ``load_checkpoint``/the importer; identifies the weights in adapter provenance."""
        L, D, r = config.num_layers, config.latent_size, config.rank
        self.module_dims = {m: (d_in, d_out) for m, d_in, d_out in config.module_dims}
        self.d_lora = max(d_in + d_out for d_in, d_out in self.module_dims.values())

        if config.layer_mix:  # zero: each layer reads its own features, exactly the published design
            self.layer_mix_delta = nn.Parameter(torch.zeros(L, L))
        self.perceiver = Perceiver(config)
        self.layers = nn.Sequential(*(ResMLPBlockPerLayer(config) for _ in range(config.num_pre_head_layers)))
        M = len(self.module_dims)
        if config.head_type == "b":  # B rows from (W_l + U_j)^T z; A learned per layer, the same for every document
            # both maps start at 0, as a LoRA's B: the network starts at its bias LoRA, and the first steps train the
            # maps (their gradient is z x dL/dB) before the encoder's gradient (through the maps) opens
            d_out_max = max(d_out for _, d_out in self.module_dims.values())
            self.head = PerLayerHead(L, M, D, d_out_max, rank=r)
            nn.init.zeros_(self.head.weight)
            self.slot_head = nn.Parameter(torch.zeros(M, r, D, d_out_max))
            self.fixed_A = nn.ParameterDict(
                {m: nn.Parameter((torch.rand(L, r, d_in) * 2 - 1) / math.sqrt(d_in)) for m, (d_in, _) in self.module_dims.items()}
            )
        else:
            self.head = PerLayerHead(L, M, D, self.d_lora, rank=r)
        # the published design starts scaler_B at 0 (an untrained network leaves the base unchanged), which
        # stalls training (config.scaler_b_init); loaded checkpoints overwrite it
        self.scaler_A = nn.ParameterDict({m: nn.Parameter(torch.ones(1, L, r, 1)) for m in self.module_dims})
        # "b": B's scaling (lora_alpha x scaler_B) starts at distillation's alpha / rank = 2 (DistillConfig), for an A
        # initialised as distill's. With scaler_B = 1 (scaling 45 at the "ab" alpha) a fresh "b" head's training KL
        # was above a fresh "ab" head's at nearly every one of 30 CPU steps on the same batches; with 2 it tracks it
        b_init = 2.0 / config.lora_alpha if config.head_type == "b" else float(config.scaler_b_init)
        self.scaler_B = nn.ParameterDict({m: nn.Parameter(torch.full((1, L, r, 1), b_init)) for m in self.module_dims})
        if config.use_bias_lora:
            self.bias_A = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(L, r, d_in) * (0.2 / math.sqrt(d_in * r))) for m, (d_in, _) in self.module_dims.items()}
            )
            self.bias_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(L, r, d_out)) for m, (_, d_out) in self.module_dims.items()})

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self.module_dims)

    # ------------------------------------------------------------------ forward, in three steps
    def aggregate(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Perceiver on every (chunk, layer) slice: ``[n, L, T, H]`` -> ``[n, L, M, r, D]``."""
        n, L, T, H = features.shape
        if (L, H) != (self.config.num_layers, self.config.hidden_size):
            msg = (
                f"Features have L={L} layers and hidden size {H}, but this hypernetwork expects "
                f"L={self.config.num_layers} and {self.config.hidden_size}. Encode with its own base model."
            )
            raise IncompatibleCheckpointError(msg)
        device, dtype = self.head.weight.device, self.head.weight.dtype
        if self.config.layer_mix:
            features = self.mix_layers(features.to(device))
        # layer-major batch (index = layer * n + chunk), as the reference; every slice is independent
        flat = features.to(device=device, dtype=dtype).transpose(0, 1).reshape(L * n, T, H)
        mask = attention_mask.to(device=device, dtype=torch.bool).repeat(L, 1)  # (L*n, T)
        latents = self.perceiver(flat, mask)  # (L*n, M*r, D)
        M, r = len(self.module_dims), self.config.rank
        return latents.reshape(L, n, M, r, -1).transpose(0, 1)  # (n, L, M, r, D)

    def mix_layers(self, features: torch.Tensor) -> torch.Tensor:
        """``config.layer_mix``: layer ``l``'s features become ``h_l + rms_l * sum_k G * delta[l, k] * h_k / rms_k``
        (per token, ``G = LAYER_MIX_GAIN``): every layer's features on one scale, mixed, and brought to the reading
        layer's own scale, on top of its own features, so that ``delta = 0`` gives back ``features`` exactly.
        Computed in ``features``' dtype (bf16 on a GPU: the trainer's batches hold ~10^9 feature values)."""
        norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True, dtype=torch.float32)  # no float32 copy of features
        rms = (norm.pow(2) / features.shape[-1] + self.config.rms_norm_eps).sqrt().to(features.dtype)  # (n, L, T, 1)
        weight = (LAYER_MIX_GAIN * self.layer_mix_delta).to(features.dtype)
        mixed = torch.einsum("lk,nkth->nlth", weight, features / rms)  # in place from here: one copy fewer a step
        return mixed.mul_(rms).add_(features)

    def project(self, lora_embeddings: torch.Tensor) -> torch.Tensor:
        """ResMLP, L2 normalisation and per-layer head: ``[n, L, M, r, D]`` -> ``[n, L, M, r, d_lora]``.

        ``head_type="b"``: ResMLP, then B rows ``(W_l + U_j)^T z / sqrt(D)`` (no per-latent normalisation, so a
        document can make a rank larger or smaller): ``[n, L, M, r, d_out]``.
        """
        return self.decode(self.layers(lora_embeddings))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The head alone, on the ResMLP's output ``z`` ``[n, L, M, r, D]``: what ``project`` does after the ResMLP
        (``benchmarks.latent_refine`` optimises ``z`` through it)."""
        if self.config.head_type == "b":  # a fixed 1/sqrt(D): latents keep their size, per-step changes of B stay as with "ab"
            z = z / math.sqrt(self.config.latent_size)
            return self.head(z) + torch.einsum("nlmrd,mrde->nlmre", z, self.slot_head)  # type: ignore[no-any-return]
        z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)  # no epsilon, as the reference
        return self.head(z)  # type: ignore[no-any-return]

    def split(self, head_out: torch.Tensor) -> ModuleFactors:
        """Cut each module's ``A | B`` out of ``[n, L, M, r, d_lora]`` and apply the scalers."""
        factors: ModuleFactors = {}
        for index, (module, (d_in, d_out)) in enumerate(self.module_dims.items()):
            out = head_out[:, :, index]  # (n, L, r, d_lora)
            if self.config.head_type == "b":  # out holds B only; A is the module's learned per-layer matrix
                A = self.fixed_A[module].unsqueeze(0).expand(out.shape[0], -1, -1, -1) * self.scaler_A[module]
                B = out[..., :d_out] * self.scaler_B[module]
            else:
                A = out[..., :d_in] * self.scaler_A[module]  # (n, L, r, d_in)
                B = out[..., d_in : d_in + d_out] * self.scaler_B[module]  # (n, L, r, d_out)
            factors[module] = (A, B)
        return factors

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> ModuleFactors:
        """Per-chunk LoRA factors, before composition.

        Args:
            features: ``[n, L, T, H]`` from ``encode_context``.
            attention_mask: ``[n, T]``, 1 on real tokens (padding is ignored exactly).

        Returns:
            module name -> (A ``[n, L, r, d_in]``, B ``[n, L, r, d_out]``).
        """
        return self.split(self.project(self.aggregate(features, attention_mask)))

    def bias_factors(self) -> ModuleFactors:
        """The bias LoRA: module -> (A ``[L, r, d_in]``, B ``[L, r, d_out]``); empty without ``use_bias_lora``."""
        if not self.config.use_bias_lora:
            return {}
        return {m: (self.bias_A[m], self.bias_B[m]) for m in self.module_dims}

    # ------------------------------------------------------------------ factors -> adapters
    def to_adapters(
        self,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        naming: ModulePathNaming | Callable[[int, str], str] | None,
        provenance: AdapterProvenance | Sequence[AdapterProvenance],
    ) -> list[LoRAAdapter]:
        """One ``LoRAAdapter`` per chunk (row) of ``factors``, each carrying the shared bias LoRA.

        ``lora_A = A[l]`` (``[r, d_in]``), ``lora_B = B[l]^T`` (``[d_out, r]``), ``scaling = lora_alpha``.

        Args:
            factors: output of ``forward``.
            naming: a ``BaseModel`` (its ``module_path``), a ``(layer, module) -> path`` function, or
                None for ``default_module_path``.
            provenance: one per chunk, or one shared by all.
        """
        path_of = _path_function(naming)
        n = next(iter(factors.values()))[0].shape[0]
        provenances = [provenance] * n if isinstance(provenance, AdapterProvenance) else list(provenance)
        if len(provenances) != n:
            msg = f"Got {len(provenances)} provenance records for {n} chunks; pass one per chunk or a single one."
            raise ValueError(msg)
        bias = self._bias_weights(path_of)
        alpha = float(self.config.lora_alpha)
        adapters = []
        for row, prov in enumerate(provenances):
            weights = {
                path_of(layer, module): LoRAWeights(A[row, layer].detach().clone(), B[row, layer].detach().T.clone(), alpha)
                for module, (A, B) in factors.items()
                for layer in range(A.shape[1])
            }
            adapters.append(LoRAAdapter(weights, prov, bias))
        return adapters

    def _bias_weights(self, path_of: Callable[[int, str], str]) -> dict[str, LoRAWeights] | None:
        bias = self.bias_factors()
        if not bias:
            return None
        alpha = float(self.config.lora_alpha)
        return {
            path_of(layer, module): LoRAWeights(A[layer].detach().clone(), B[layer].detach().T.clone(), alpha)
            for module, (A, B) in bias.items()
            for layer in range(A.shape[0])
        }


def _path_function(naming: ModulePathNaming | Callable[[int, str], str] | None) -> Callable[[int, str], str]:
    if naming is None:
        return default_module_path
    if hasattr(naming, "module_path"):
        return naming.module_path
    return naming


def grow_rank(net: Hypernetwork, rank: int, *, seed: int = 0) -> Hypernetwork:
    """A copy of ``net`` that generates rank-``rank`` LoRAs, starting with exactly ``net``'s adapters.

    Each module gets ``rank - r`` new decoder queries (perturbed copies of its existing ones) whose
    B scalers start at 0, and the bias LoRA gets new rows with B = 0, so every delta ``B^T A`` is
    unchanged until training moves them (``lora_alpha`` is kept). The head, most of the weights,
    does not depend on the rank: a grown checkpoint is barely larger. For fine-tuning a trained
    checkpoint with more rank instead of starting again.
    """
    old = net.config.rank
    if net.config.head_type != "ab":
        msg = f"grow_rank supports head_type 'ab', this network has {net.config.head_type!r}; use replace_head(net, rank=...) on an 'ab' network."
        raise ValueError(msg)
    if rank < old:
        msg = f"grow_rank makes the rank larger: {net.config.rank} -> {rank} would drop trained ranks. Give rank >= {old}."
        raise ValueError(msg)
    ref = net.head.weight
    grown = Hypernetwork(dataclasses.replace(net.config, rank=rank)).to(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator().manual_seed(seed)
    new = rank - old
    M, D = len(net.module_dims), net.config.latent_size

    def pad(t: torch.Tensor, dim: int, extra: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, extra.to(device=t.device, dtype=t.dtype)], dim=dim)

    state = {}
    for key, value in net.state_dict().items():
        if key == "perceiver.decoder.latents_q":  # module-major: query m * r + i
            q = value.reshape(M, old, D)
            pick = torch.randint(old, (M, new), generator=gen)
            copies = torch.stack([q[m, pick[m]] for m in range(M)]).cpu().float()
            noise = 0.1 * copies.std() * torch.randn(copies.shape, generator=gen)
            value = pad(q, 1, copies + noise).reshape(M * rank, D)
        elif key.startswith(("scaler_A.", "scaler_B.")):  # (1, L, r, 1)
            fill = 1.0 if key.startswith("scaler_A.") else 0.0
            value = pad(value, 2, torch.full((1, value.shape[1], new, 1), fill))
        elif key.startswith("bias_A."):  # (L, r, d_in)
            value = pad(value, 1, torch.randn(value.shape[0], new, value.shape[2], generator=gen) * (0.2 / math.sqrt(value.shape[2] * rank)))
        elif key.startswith("bias_B."):  # (L, r, d_out)
            value = pad(value, 1, torch.zeros(value.shape[0], new, value.shape[2]))
        state[key] = value
    grown.load_state_dict(state)
    return grown


def add_layer_mix(net: Hypernetwork) -> Hypernetwork:
    """A copy of ``net`` with ``config.layer_mix`` on and its mix at zero: exactly the same adapters, and an
    ``[L, L]`` matrix that training can open, so each layer's adapter can read every layer's features
    (``HypernetworkConfig.layer_mix``). ``net`` itself is returned if it has one."""
    if net.config.layer_mix:
        return net
    ref = net.head.weight
    mixed = Hypernetwork(dataclasses.replace(net.config, layer_mix=True)).to(device=ref.device, dtype=ref.dtype)
    result = mixed.load_state_dict(net.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"layer_mix_delta"}:
        msg = f"add_layer_mix could not copy the network: missing {result.missing_keys}, unexpected {result.unexpected_keys}."
        raise RuntimeError(msg)
    return mixed


def grow_latents(net: Hypernetwork, factor: int = 2, *, noise: float = 0.02, seed: int = 0) -> Hypernetwork:
    """A copy of ``net`` whose Perceiver encoder has ``factor`` times as many latents, each old latent
    repeated ``factor`` times (plus ``noise`` x its std, so the copies can drift apart in training).

    The encoder's latents never attend to each other, and the decoder's softmax over ``factor``
    identical copies of every latent gives the same average as over the originals, so with
    ``noise=0`` the adapters are exactly ``net``'s; with a little noise they are nearly so. More
    latents are more room for what the encoder reads out of a document, for the same head and
    checkpoint size (``num_latents x latent_size`` more numbers).
    """
    if factor < 1:
        msg = f"grow_latents multiplies the number of latents: give factor >= 1, got {factor}."
        raise ValueError(msg)
    ref = net.head.weight
    old = net.config.num_latents
    grown = Hypernetwork(dataclasses.replace(net.config, num_latents=old * factor)).to(device=ref.device, dtype=ref.dtype)
    gen = torch.Generator().manual_seed(seed)
    state = dict(net.state_dict())
    q = state["perceiver.encoder.latents_q"]  # (num_latents, D)
    copies = q.detach().cpu().float().repeat(factor - 1, 1)
    copies = copies + noise * float(q.float().std()) * torch.randn(copies.shape, generator=gen)
    state["perceiver.encoder.latents_q"] = torch.cat([q, copies.to(device=q.device, dtype=q.dtype)])
    grown.load_state_dict(state)
    return grown


def replace_head(net: Hypernetwork, head_type: str = "b", *, rank: int | None = None, seed: int = 0) -> Hypernetwork:
    """A copy of ``net`` (``head_type="ab"``) with a new, untrained head of ``head_type`` (and LoRA rank ``rank``).

    The encoder (Perceiver), the per-layer ResMLP and the bias LoRA are kept (with ``rank`` above
    ``net``'s, grown first as in ``grow_rank``); the head, its scalers and, for ``"b"``, the per-layer A
    start fresh. For training a new head on a trained encoder (``train_d2l --new-head b``): the
    adapters change at step 0, so this is a new run, not a continuation. ``head_type="ab"`` gives a
    fresh head of the published design: the control for a new design trained for as many steps.
    """
    if net.config.head_type != "ab":
        msg = f"replace_head starts from a head_type 'ab' network, got {net.config.head_type!r}."
        raise ValueError(msg)
    source = grow_rank(net, rank, seed=seed) if rank is not None and rank != net.config.rank else net
    ref = net.head.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = Hypernetwork(dataclasses.replace(source.config, head_type=head_type))
    fresh = fresh.to(device=ref.device, dtype=ref.dtype)
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "scaler_A.", "scaler_B."))}
    result = fresh.load_state_dict(kept, strict=False)
    if result.unexpected_keys:
        msg = f"replace_head: keys of the old network have no place in the new one: {result.unexpected_keys}."
        raise ValueError(msg)
    return fresh


def check_base_shapes(config: HypernetworkConfig, base: Any) -> None:
    """Raise ``IncompatibleCheckpointError`` unless ``base`` has the layers and widths of ``config``."""
    found = (base.num_layers, base.hidden_size, base.module_dims(config.target_modules))
    expected = (config.num_layers, config.hidden_size, tuple(tuple(m) for m in config.module_dims))
    if found != expected:
        msg = (
            f"The hypernetwork was made for base model {config.base_model!r} (layers, hidden size, module dims) = "
            f"{expected}, but {base.name!r} has {found}. Load {config.base_model!r}, or use a checkpoint "
            f"trained for {base.name!r}."
        )
        raise IncompatibleCheckpointError(msg)


# ----------------------------------------------------------------------------- internalizer


def chunk_sha256(text: str) -> str:
    """sha256 of a chunk's UTF-8 text (adapter provenance and store keys)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HypernetworkInternalizer:
    """Internalizer that turns chunks into adapters with one hypernetwork forward per batch.

    Chunks are tokenized per ``config.context_format``, sorted by length, padded into batches of at
    most ``max_batch_size`` chunks (and ``max_batch_tokens`` padded tokens, if given), encoded by
    the frozen base and mapped to LoRA factors under ``torch.inference_mode``. Padding never
    changes an adapter, so results do not depend on batching.

    Args:
        hypernetwork: the trained (or imported) hypernetwork; moved to the base model's device on use.
        checkpoint_id: id recorded in provenance; defaults to ``hypernetwork.checkpoint_id``.
        max_batch_size: most chunks per forward pass (bounds memory).
        max_batch_tokens: most padded tokens per forward pass, or None for no bound.
    """

    name: str = "hypernetwork"

    def __init__(
        self,
        hypernetwork: Hypernetwork,
        *,
        checkpoint_id: str | None = None,
        max_batch_size: int = 8,
        max_batch_tokens: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            msg = f"max_batch_size must be >= 1, got {max_batch_size}."
            raise ConfigError(msg)
        self.hypernetwork = hypernetwork.eval()
        self.storage_dtype = next(hypernetwork.parameters()).dtype
        """The checkpoint's dtype: adapters are handed out in it, whatever the network computes in (``compute_dtype``)."""
        self.checkpoint_id = checkpoint_id if checkpoint_id is not None else hypernetwork.checkpoint_id
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefer_over_distill = False
        """Held-out evals say this checkpoint beats gradient distillation (set by ``load_internalizer``)."""
        self.metadata: dict[str, Any] = {}
        """The checkpoint's metadata (data summary, eval table, ...), when loaded from a folder."""

    @property
    def config(self) -> HypernetworkConfig:
        return self.hypernetwork.config

    def compute_dtype(self, base: Any) -> torch.dtype:
        """float32 where the base model computes in float32, else the checkpoint's own dtype.

        A bf16 checkpoint on a CPU without native bf16 (where ``dtype="auto"`` loads the base in float32) would run
        emulated bf16 matmuls: 2.1 s against 0.85 s per chunk for the default model on 2 cores (session 17).
        """
        return torch.float32 if getattr(base, "dtype", None) == torch.float32 else self.storage_dtype

    def tokenize_chunk(self, base: Any, chunk: str) -> list[int]:
        """Encoder input ids of ``chunk`` per ``config.context_format``."""
        tokenizer = base.tokenizer
        if self.config.context_format == "chat_prefix":
            return _chat_prefix_ids(tokenizer, chunk, self.config.chat_system_prompt)
        if self.config.context_format == "chat":
            return _chat_turn_ids(tokenizer, chunk)
        ids = list(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]:
            ids = [bos, *ids]
        return ids

    def internalize_chunks(
        self,
        base: Any,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        """One adapter per chunk; ``adapters[i].provenance.source_sha256 == (sha256(chunks[i]),)``."""
        check_chunks(chunks, chunk_ids)
        check_base_shapes(self.config, base)
        token_ids = [self.tokenize_chunk(base, c) for c in chunks]
        _check_lengths(token_ids, base.context_window)
        self.hypernetwork.to(device=base.device, dtype=self.compute_dtype(base))
        adapters: list[LoRAAdapter | None] = [None] * len(chunks)
        done = 0
        with torch.inference_mode():
            for batch in self._batches(token_ids):
                provenance = [self._provenance(base, chunks[i], chunk_ids[i] if chunk_ids else None, len(token_ids[i])) for i in batch]
                for i, adapter in zip(batch, self._internalize_batch(base, [token_ids[i] for i in batch], provenance), strict=True):
                    adapters[i] = adapter
                done += len(batch)
                if progress is not None:
                    progress(done, len(chunks))
        return [a for a in adapters if a is not None]

    def _internalize_batch(self, base: Any, token_ids: list[list[int]], provenance: list[AdapterProvenance]) -> list[LoRAAdapter]:
        width = max(len(ids) for ids in token_ids)
        pad = getattr(base.tokenizer, "pad_token_id", None) or 0
        input_ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):  # right padding, as the reference collator
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        features = encode_context(base, input_ids, mask)
        factors = self.hypernetwork(features, mask.to(features.device))
        adapters = self.hypernetwork.to_adapters(factors, base, provenance)
        if next(self.hypernetwork.parameters()).dtype != self.storage_dtype:
            adapters = [a.to(dtype=self.storage_dtype) for a in adapters]
        return adapters

    def _batches(self, token_ids: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            width = len(token_ids[i])  # sorted, so the newest chunk is the widest
            too_many = len(current) >= self.max_batch_size
            too_wide = self.max_batch_tokens is not None and (len(current) + 1) * width > self.max_batch_tokens
            if current and (too_many or too_wide):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _provenance(self, base: Any, chunk: str, chunk_id: str | None, num_tokens: int) -> AdapterProvenance:
        return AdapterProvenance(
            base_model=base.name,
            base_model_revision=base.revision,
            checkpoint_id=self.checkpoint_id,
            method="hypernetwork",
            source_sha256=(chunk_sha256(chunk),),
            chunk_ids=(chunk_id,) if chunk_id is not None else (),
            extra={"rank": str(self.config.rank), "context_format": self.config.context_format, "context_tokens": str(num_tokens)},
        )


def _chat_prefix_ids(tokenizer: Any, chunk: str, system_prompt: str | None) -> list[int]:
    """The chat template's system + user prefix up to and including ``chunk`` (no end-of-turn).

    This is the teacher prompt's prefix through the document as the distillation trainer builds
    it, so the features at inference equal those seen in training.
    """
    if not getattr(tokenizer, "chat_template", None):
        msg = "context_format='chat_prefix' needs a tokenizer with a chat template; this one has none. Use context_format='raw'."
        raise ConfigError(msg)
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages = [*system, {"role": "user", "content": chunk}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    end = text.rfind(chunk)
    if end < 0:
        msg = "The chat template altered the chunk text, so its prefix cannot be cut. Use context_format='raw'."
        raise ConfigError(msg)
    return list(tokenizer(text[: end + len(chunk)], add_special_tokens=False)["input_ids"])


def _chat_turn_ids(tokenizer: Any, chunk: str) -> list[int]:
    """The reference's context input: empty system message, stripped chunk as user turn, generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        msg = "context_format='chat' needs a tokenizer with a chat template; this one has none. Use context_format='raw'."
        raise ConfigError(msg)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": chunk.strip()}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_lengths(token_ids: list[list[int]], context_window: int) -> None:
    for index, ids in enumerate(token_ids):
        if len(ids) > context_window:
            msg = (
                f"Chunk {index} has {len(ids)} tokens, more than the base model's context window ({context_window}). "
                "Split the document into smaller chunks (D2LEngine.chunk(text, chunk_tokens=...))."
            )
            raise InvalidDocumentError(msg)
        if not ids:
            msg = f"Chunk {index} tokenizes to no tokens; pass non-empty text."
            raise InvalidDocumentError(msg)


__all__ = [
    "CrossAttention",
    "Hypernetwork",
    "HypernetworkInternalizer",
    "ModuleFactors",
    "ModulePathNaming",
    "Perceiver",
    "PerceiverLayer",
    "PerceiverStack",
    "PerLayerHead",
    "PerLayerLinear",
    "RMSNorm",
    "ResMLPBlockPerLayer",
    "SwiGLU",
    "check_base_shapes",
    "chunk_sha256",
    "default_module_path",
    "encode_context",
    "features_from_hidden_states",
]
