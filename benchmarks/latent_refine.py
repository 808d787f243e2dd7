"""Per-document distillation *around* the hypernetwork: is the limit its head, or its encoder?

The hypernetwork writes each document's adapter through a fixed, learned head: every rank-one piece
``(A_i, B_i)`` of layer ``l`` is ``head_l(z_i / |z_i|)`` for one latent ``z_i`` of ``latent_size``
numbers. So the adapters it can ever produce live in a small space (``L x r x D`` numbers per
document: 30 x 8 x 128 for the default), and the encoder (Perceiver over the document's features)
only chooses a point in it. Two distillation variants, on the same teacher data as plain
``distill`` (``DistillInternalizer._prepare_chunk``), separate the two failure modes:

``head``  optimise the latents ``z`` of one document directly (the head, scalers and bias LoRA fixed),
          starting from the encoder's own ``z``. What the head *can* express for this document.
          If it reaches plain distillation's accuracy, the head is not the limit: the encoder is.
``head_ab`` as ``head``, with one latent for each A row and another for each B row (both start at the
          encoder's ``z``). The head ties them: a layer's delta is ``W_B^T (sum_i c_i z_i z_i^T) W_A``, a
          *symmetric* rank-``r`` core with per-rank weights ``c_i`` that no document changes. If
          ``head_ab`` fits where ``head`` cannot, untying A and B is the architectural change to make.
``head_gain`` as ``head``, each unit latent times a trained gain (1 at step 0): the head's L2 normalisation
          fixes every rank's size, so a document cannot make its adapter smaller; this frees that.
``free_proj`` ``free``, then every A row projected onto the row space of the head's A block and every B
          row onto its B block's (per layer: ``latent_size``-dimensional subspaces of the module's input
          and output spaces). If it keeps ``free``'s accuracy, the head's subspaces are wide enough and
          its tied, fixed-size decoding is what loses the document; if not, the head is too narrow.
``warm``  the hypernetwork's adapter, fixed, plus a free rank-``r`` LoRA trained on top (its B starts
          at 0, so step 0 is exactly the hypernetwork's adapter): distillation warm-started by the
          hypernetwork, against ``free`` (plain distillation from zero).

Two more, for the design of the next head (no hypernetwork needed):
``free_b``  ``free`` with A frozen at its random init: only B is trained. If it fits as well as ``free``, a
          head need not write A at all (a learned, document-independent A per layer would do).
``rand_b``  ``free_b`` with each of B's ``r`` columns written from its own latent of ``width`` numbers through a
          fixed *random* map (``B[:, j] = G_j^T c_j``; ``rand_b:0.01`` sets the latents' lr; width = the
          hypernetwork's ``latent_size``, 128 by default, option ``rand_width``). Per document that is ``L x r x
          width`` numbers, as many as ``head`` optimises, but no two columns share a subspace and A and B are
          not tied. If it fits where ``head`` cannot, the structure of today's head is the limit, not the number of
          numbers a document gets.

Used by ``benchmarks.distill_curve`` (``variants=free,head,warm``).
"""

from __future__ import annotations

import torch
from torch import nn

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.distill import DistillConfig, _ChunkData, _GroupTrainer, _RowLoRA, _stable_hash
from d2l_integrations.engine.hypernetwork import HypernetworkInternalizer, encode_context
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights

VARIANTS = ("free", "free_proj", "head", "head_ab", "head_gain", "warm", "free_b", "rand_b")
NEEDS_HYPERNETWORK = ("free_proj", "head", "head_ab", "head_gain", "warm")


@torch.no_grad()
def encoder_latents(internalizer: HypernetworkInternalizer, base: BaseModel, texts: list[str]) -> torch.Tensor:
    """The hypernetwork's latents before normalisation and head, ``[C, L, M, r, D]`` (fp32), one row per text."""
    net = internalizer.hypernetwork.to(base.device)
    token_ids = [internalizer.tokenize_chunk(base, t) for t in texts]
    width = max(len(ids) for ids in token_ids)
    pad = getattr(base.tokenizer, "pad_token_id", None) or 0
    input_ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):  # right padding, as HypernetworkInternalizer
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    features = encode_context(base, input_ids, mask)
    return net.layers(net.aggregate(features, mask.to(features.device))).float()


class ComposedLoRA(_RowLoRA):
    """Per chunk: the hypernetwork's adapter from latents ``z`` (trained if ``train_latents``; B from its own
    latents ``z_b`` if ``untie``), its bias LoRA, and, if ``free``, a trainable rank-``cfg.rank`` LoRA
    (``_RowLoRA``'s init: B = 0). All parts are concatenated along the rank with their scalings folded
    into B, so the hook's scaling is 1."""

    def __init__(self, base: BaseModel, module_paths: list[str], cfg: DistillConfig, seeds: list[int],
                 internalizer: HypernetworkInternalizer, z0: torch.Tensor, *, train_latents: bool, free: bool,
                 untie: bool = False, gain: bool = False) -> None:
        super().__init__(base, module_paths, len(seeds), cfg, seeds)
        self.free_A, self.free_B = (self.lora_A, self.lora_B) if free else ({}, {})
        self.free_scaling = cfg.scaling
        self.net = internalizer.hypernetwork.to(base.device).float().requires_grad_(False)
        self.z = nn.Parameter(z0.detach().clone().to(base.device), requires_grad=train_latents)
        self.z_b = nn.Parameter(z0.detach().clone().to(base.device), requires_grad=train_latents) if untie else None
        self.gain = nn.Parameter(torch.ones(*z0.shape[:-1], 1, device=base.device), requires_grad=train_latents) if gain else None
        self.path = base.module_path
        self.scaling = 1.0
        self.refresh()

    def parameters(self) -> list[nn.Parameter]:
        return self.latents() + [*self.free_A.values(), *self.free_B.values()]

    def latents(self) -> list[nn.Parameter]:
        """The trained latents (none unless ``train_latents``)."""
        return [z for z in (self.z, self.z_b, self.gain) if z is not None and z.requires_grad]

    def refresh(self) -> None:
        """Recompute the composed factors from the current parameters (call before every forward)."""
        net = self.net
        if net.config.head_type == "b":  # no normalisation in this head: the gain scales z, and z's size counts
            def decode(z: torch.Tensor) -> torch.Tensor:
                return net.decode(z if self.gain is None else z * self.gain)
        else:
            def decode(z: torch.Tensor) -> torch.Tensor:
                z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
                return net.head(z if self.gain is None else z * self.gain)

        z = self.z
        factors = net.split(decode(z))  # module -> (A [C, L, r, d_in], B [C, L, r, d_out])
        if self.z_b is not None:  # untied: B rows from their own latents (for "b", A is the layer's own anyway)
            from_b = net.split(decode(self.z_b))
            factors = {m: (A, from_b[m][1]) for m, (A, _) in factors.items()}
        bias = net.bias_factors()
        alpha, C = float(net.config.lora_alpha), z.shape[0]
        lora_A: dict[str, torch.Tensor] = {}
        lora_B: dict[str, torch.Tensor] = {}
        for module, (A, B) in factors.items():
            for layer in range(A.shape[1]):
                name = self.path(layer, module)
                As, Bs = [A[:, layer]], [B[:, layer] * alpha]
                if module in bias:
                    As.append(bias[module][0][layer].expand(C, -1, -1))
                    Bs.append(bias[module][1][layer].expand(C, -1, -1) * alpha)
                if name in self.free_A:
                    As.append(self.free_A[name])
                    Bs.append(self.free_B[name].transpose(1, 2) * self.free_scaling)
                lora_A[name] = torch.cat(As, 1)  # (C, r', d_in)
                lora_B[name] = torch.cat(Bs, 1).transpose(1, 2)  # (C, d_out, r')
        self.lora_A, self.lora_B = lora_A, lora_B


class ComposedTrainer(_GroupTrainer):
    """``_GroupTrainer`` over a ``ComposedLoRA``: latents at ``latent_lr``, the free LoRA at ``cfg.lr``."""

    def __init__(self, base: BaseModel, cfg: DistillConfig, data: list[_ChunkData], module_paths: list[str],
                 lora: ComposedLoRA, *, latent_lr: float) -> None:
        super().__init__(base, cfg, data, module_paths)
        self.lora = lora  # type: ignore[assignment]
        groups = [{"params": lora.latents(), "lr": latent_lr, "base_lr": latent_lr}] if lora.latents() else []
        if lora.free_A:  # base_lr: what a cosine schedule (cfg.lr_schedule) decays from
            groups.append({"params": [*lora.free_A.values(), *lora.free_B.values()], "lr": cfg.lr, "base_lr": cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    def _loss(self, batch: list) -> torch.Tensor:
        self.lora.refresh()  # type: ignore[attr-defined]
        return super()._loss(batch)

    def _factors_now(self, c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():  # the factors after the last optimizer step, not those of the last forward
            self.lora.refresh()  # type: ignore[attr-defined]
        return super()._factors_now(c)


class RandomHeadLoRA(_RowLoRA):
    """``free_b`` / ``rand_b``: A frozen at ``_RowLoRA``'s random init; B trained freely (``width=None``) or, per chunk,
    column ``j`` of B from its own latent ``c_j`` (``width`` numbers, starting at 0) through a fixed random map."""

    def __init__(self, base: BaseModel, module_paths: list[str], cfg: DistillConfig, seeds: list[int], *,
                 width: int | None, seed: int = 0) -> None:
        super().__init__(base, module_paths, len(seeds), cfg, seeds)
        for a in self.lora_A.values():
            a.requires_grad_(False)
        self.paths = list(module_paths)
        self.maps: dict[str, torch.Tensor] = {}
        self.c: nn.Parameter | None = None
        if width:
            g = torch.Generator().manual_seed(seed)
            for name in self.paths:
                d_out = self.lora_B[name].shape[1]
                self.maps[name] = (torch.randn(cfg.rank, width, d_out, generator=g) / width**0.5).to(base.device)
            self.c = nn.Parameter(torch.zeros(len(seeds), len(self.paths), cfg.rank, width, device=base.device))
            self.refresh()

    def parameters(self) -> list[nn.Parameter]:
        return [self.c] if self.c is not None else list(self.lora_B.values())

    def refresh(self) -> None:
        """B from the latents (``rand_b``; call before every forward); nothing for ``free_b``."""
        if self.c is not None:
            self.lora_B = {name: torch.einsum("crs,rso->cor", self.c[:, j], self.maps[name]) for j, name in enumerate(self.paths)}


class RandomHeadTrainer(ComposedTrainer):
    """``_GroupTrainer`` over a ``RandomHeadLoRA``: its trainable part (B, or the latents) at ``lr``."""

    def __init__(self, base: BaseModel, cfg: DistillConfig, data: list[_ChunkData], module_paths: list[str],
                 lora: RandomHeadLoRA, *, lr: float) -> None:
        _GroupTrainer.__init__(self, base, cfg, data, module_paths)
        self.lora = lora  # type: ignore[assignment]
        self.optimizer = torch.optim.AdamW([{"params": lora.parameters(), "lr": lr, "base_lr": lr}], weight_decay=0.0)


def composed_adapter(base: BaseModel, chunk: _ChunkData, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     variant: str, scaling: float = 1.0) -> LoRAAdapter:
    """An adapter from a variant's factors (``ComposedLoRA``'s have their scaling folded in: 1)."""
    weights = {name: LoRAWeights(a, b, scaling) for name, (a, b) in factors.items()}
    provenance = AdapterProvenance(base_model=base.name, base_model_revision=base.revision, checkpoint_id=f"latent-refine-{variant}",
                                   method="distill", source_sha256=(chunk.sha256,), chunk_ids=(), extra={"variant": variant})
    return LoRAAdapter(weights, provenance)


def head_projectors(internalizer: HypernetworkInternalizer, base: BaseModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path: orthogonal projectors ``(P_in [d_in, d_in], P_out [d_out, d_out])`` onto the row spaces
    of the head's A and B blocks of that layer (every A row / B row the head can write lies in them)."""
    net = internalizer.hypernetwork
    out = {}
    with torch.no_grad():
        for index, (module, (d_in, d_out)) in enumerate(net.module_dims.items()):
            for layer in range(net.config.num_layers):
                w = net.head.weight[layer, index].float().to(base.device)  # (D, d_lora)
                projectors = []
                for block in (w[:, :d_in], w[:, d_in : d_in + d_out]):
                    q, _ = torch.linalg.qr(block.T)  # (d, D): orthonormal basis of the block's row space
                    projectors.append(q @ q.T)
                out[base.module_path(layer, module)] = (projectors[0], projectors[1])
    return out


def refine(base: BaseModel, cfg: DistillConfig, data: list[_ChunkData], module_paths: list[str], variant: str, *,
           internalizer: HypernetworkInternalizer | None, texts: list[str], latent_lr: float,
           snapshot_steps: list[int], rand_width: int = 128) -> tuple[dict[int, list[LoRAAdapter]], list[tuple[float, float]]]:
    """Train one group of chunks with ``variant`` (one of ``VARIANTS``).

    Returns:
        adapters at each snapshot step, and each chunk's (first, last) training KL.
    """
    if variant not in VARIANTS:
        msg = f"Unknown variant {variant!r}; use one of {', '.join(VARIANTS)}."
        raise ValueError(msg)
    if variant in NEEDS_HYPERNETWORK and internalizer is None:
        msg = f"Variant {variant!r} needs a hypernetwork (checkpoint=...)."
        raise ValueError(msg)
    project = head_projectors(internalizer, base) if variant == "free_proj" else None
    seeds = [cfg.seed + _stable_hash(d.sha256) for d in data]  # as _GroupTrainer
    if variant in ("free", "free_proj"):
        trainer = _GroupTrainer(base, cfg, data, module_paths)
    elif variant in ("free_b", "rand_b"):
        width = rand_width if variant == "rand_b" else None
        lora_b = RandomHeadLoRA(base, module_paths, cfg, seeds, width=width, seed=cfg.seed)
        trainer = RandomHeadTrainer(base, cfg, data, module_paths, lora_b, lr=latent_lr if width else cfg.lr)
    else:
        lora = ComposedLoRA(base, module_paths, cfg, seeds, internalizer, encoder_latents(internalizer, base, texts),
                            train_latents=variant.startswith("head"), free=variant == "warm", untie=variant == "head_ab",
                            gain=variant == "head_gain")
        trainer = ComposedTrainer(base, cfg, data, module_paths, lora, latent_lr=latent_lr)

    def make(b: BaseModel, chunk: _ChunkData, factors: dict, stats: dict) -> LoRAAdapter:
        del stats
        if variant not in ("free", "free_proj", "free_b", "rand_b"):
            return composed_adapter(b, chunk, factors, variant)
        if project is not None:
            factors = {n: (a @ project[n][0], (bb.T @ project[n][1]).T) for n, (a, bb) in factors.items()}
        return composed_adapter(b, chunk, factors, variant, cfg.scaling)

    _, snaps = trainer.run(snapshot_steps, make)
    kl = list(zip(trainer.first_kl, trainer.last_kl, strict=True))
    return {s: adapters for s, (_, adapters) in snaps.items()}, kl
