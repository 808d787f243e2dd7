"""LoRA adapters as values: factors, provenance, composition, save/load and PEFT export.

Conventions follow peft (``lora_A`` maps in -> r, ``lora_B`` maps r -> out):

    lora_A: [r, d_in]      lora_B: [d_out, r]      delta_W = scaling * lora_B @ lora_A    # [d_out, d_in]

A D2L hypernetwork emits one adapter per document chunk plus one document-independent *bias*
LoRA. Chunk adapters compose by summing their deltas, which is a concatenation on the rank axis;
the bias LoRA is counted once, whatever the number of chunks (as in the reference ``combine_lora``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from d2l_integrations.engine.atomic import atomic_folder
from d2l_integrations.errors import ExportError, IncompatibleAdapterError

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LoRAWeights:
    """The LoRA factors of one linear module.

    Args:
        lora_A: ``[r, d_in]``.
        lora_B: ``[d_out, r]``.
        scaling: multiplies ``lora_B @ lora_A``. D2L applies its alpha directly (not alpha / r).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.lora_A.dim() != 2 or self.lora_B.dim() != 2:
            msg = (
                f"lora_A and lora_B must be 2-D ([r, d_in] and [d_out, r]); got shapes "
                f"{tuple(self.lora_A.shape)} and {tuple(self.lora_B.shape)}."
            )
            raise IncompatibleAdapterError(msg)
        if self.lora_A.shape[0] != self.lora_B.shape[1]:
            msg = (
                f"Rank mismatch: lora_A has r={self.lora_A.shape[0]} rows but lora_B has "
                f"r={self.lora_B.shape[1]} columns."
            )
            raise IncompatibleAdapterError(msg)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """``scaling * lora_B @ lora_A`` in float32, shape ``[d_out, d_in]``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def folded(self) -> LoRAWeights:
        """The same delta with the scaling multiplied into ``lora_B`` (scaling becomes 1)."""
        if self.scaling == 1.0:
            return self
        return LoRAWeights(self.lora_A, self.lora_B * self.scaling, 1.0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoRAWeights:
        return LoRAWeights(self.lora_A.to(device=device, dtype=dtype), self.lora_B.to(device=device, dtype=dtype), self.scaling)


def concat_ranks(parts: Sequence[LoRAWeights]) -> LoRAWeights:
    """Concatenate factors on the rank axis: the result's delta is the sum of the parts' deltas."""
    if not parts:
        msg = "concat_ranks needs at least one LoRAWeights."
        raise IncompatibleAdapterError(msg)
    shapes = {(p.in_features, p.out_features) for p in parts}
    if len(shapes) != 1:
        msg = f"Cannot compose LoRA factors of different module shapes (d_in, d_out): {sorted(shapes)}."
        raise IncompatibleAdapterError(msg)
    if len(parts) == 1:
        return parts[0]
    scalings = {p.scaling for p in parts}
    if len(scalings) != 1:  # fold each part's scaling so that one shared scaling (1.0) is exact
        parts = [p.folded() for p in parts]
    dtype = parts[0].lora_A.dtype
    lora_A = torch.cat([p.lora_A.to(dtype) for p in parts], dim=0)
    lora_B = torch.cat([p.lora_B.to(dtype) for p in parts], dim=1)
    return LoRAWeights(lora_A, lora_B, parts[0].scaling)


@dataclass(frozen=True, kw_only=True)
class AdapterProvenance:
    """Where an adapter came from. Stored as string metadata beside the tensors."""

    base_model: str
    """Name or path of the base model the adapter was made for."""
    base_model_revision: str | None = None
    """sha256 (or hub revision) of the base weights, when known."""
    checkpoint_id: str | None = None
    """Id of the hypernetwork checkpoint that produced it; None for gradient-trained adapters."""
    method: str = "hypernetwork"
    """``hypernetwork``, ``distill``, ``composed`` or ``external``."""
    source_sha256: tuple[str, ...] = ()
    """sha256 of each source chunk's text, in rank order."""
    chunk_ids: tuple[str, ...] = ()
    """Caller-given ids of the chunks, in rank order (may be empty)."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Free-form string metadata (e.g. distillation settings)."""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["source_sha256"] = list(self.source_sha256)
        d["chunk_ids"] = list(self.chunk_ids)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> AdapterProvenance:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["source_sha256"] = tuple(kw.get("source_sha256", ()))  # type: ignore[arg-type]
        kw["chunk_ids"] = tuple(kw.get("chunk_ids", ()))  # type: ignore[arg-type]
        kw["extra"] = dict(kw.get("extra", {}))  # type: ignore[call-overload]
        return cls(**kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoRAAdapter:
    """An internalized document (or several): per-module LoRA factors plus provenance.

    Args:
        weights: module path (e.g. ``model.layers.3.mlp.down_proj``) -> document-specific factors.
        provenance: where the adapter came from.
        bias: the hypernetwork's document-independent bias LoRA (module path -> factors), or
            None. Applied once, however many chunk adapters are composed.
    """

    weights: Mapping[str, LoRAWeights]
    provenance: AdapterProvenance
    bias: Mapping[str, LoRAWeights] | None = None

    def __post_init__(self) -> None:
        if not self.weights:
            msg = "A LoRAAdapter needs factors for at least one module."
            raise IncompatibleAdapterError(msg)

    # ------------------------------------------------------------------ inspection
    @property
    def module_names(self) -> tuple[str, ...]:
        names = set(self.weights)
        if self.bias:
            names |= set(self.bias)
        return tuple(sorted(names, key=_natural_key))

    @property
    def rank(self) -> int:
        """Document-specific rank (the bias LoRA not counted)."""
        return max(w.rank for w in self.weights.values())

    @property
    def num_chunks(self) -> int:
        return max(1, len(self.provenance.source_sha256))

    @property
    def nbytes(self) -> int:
        """Bytes of all factor tensors (bias included)."""
        total = 0
        for group in (self.weights, self.bias or {}):
            for w in group.values():
                total += w.lora_A.numel() * w.lora_A.element_size() + w.lora_B.numel() * w.lora_B.element_size()
        return total

    def effective(self, module: str) -> LoRAWeights | None:
        """Factors to apply to ``module``: document factors and bias concatenated."""
        parts = [g[module] for g in (self.weights, self.bias or {}) if module in g]
        return concat_ranks(parts) if parts else None

    def delta_weight(self, module: str) -> torch.Tensor:
        eff = self.effective(module)
        if eff is None:
            msg = f"Adapter has no factors for module {module!r}. It covers: {list(self.module_names)}."
            raise IncompatibleAdapterError(msg)
        return eff.delta_weight()

    def without_bias(self) -> LoRAAdapter:
        return replace(self, bias=None)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoRAAdapter:
        return LoRAAdapter(
            {k: w.to(device, dtype) for k, w in self.weights.items()},
            self.provenance,
            {k: w.to(device, dtype) for k, w in self.bias.items()} if self.bias else None,
        )

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` atomically into ``directory``.

        The folder is first written under a temporary name beside it, then renamed, so a crash
        never leaves a half-written adapter. An existing folder is replaced.
        """
        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        scalings: dict[str, float] = {}
        for prefix, group in (("", self.weights), ("bias.", self.bias or {})):
            for name, w in group.items():
                tensors[f"{prefix}{name}.lora_A"] = w.lora_A.detach().contiguous().cpu()
                tensors[f"{prefix}{name}.lora_B"] = w.lora_B.detach().contiguous().cpu()
                scalings[f"{prefix}{name}"] = float(w.scaling)
        config = {
            "format": "d2l_integrations.lora",
            "format_version": FORMAT_VERSION,
            "provenance": self.provenance.to_dict(),
            "scalings": scalings,
            "has_bias": bool(self.bias),
        }
        with atomic_folder(directory) as tmp:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", "d2l_config": json.dumps(config)})
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> LoRAAdapter:
        directory = Path(directory)
        cfg_path = directory / ADAPTER_CONFIG_NAME
        if not cfg_path.is_file():
            msg = (
                f"No adapter at {str(directory)!r}: {ADAPTER_CONFIG_NAME} is missing. "
                "Pass a folder written by LoRAAdapter.save()."
            )
            raise FileNotFoundError(msg)
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME), device=str(device))
        groups: dict[str, dict[str, LoRAWeights]] = {"": {}, "bias.": {}}
        for key, scaling in config["scalings"].items():
            prefix = "bias." if key.startswith("bias.") else ""
            name = key[len(prefix):]
            groups[prefix][name] = LoRAWeights(tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"], float(scaling))
        return cls(groups[""], AdapterProvenance.from_dict(config["provenance"]), groups["bias."] or None)

    # ------------------------------------------------------------------ PEFT export
    def to_peft(self, directory: str | os.PathLike[str], *, base_model_name_or_path: str | None = None) -> Path:
        """Write a standard PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

        The composed rank (chunks + bias) becomes ``r``; the scaling is folded into ``lora_B`` and
        ``lora_alpha = r`` so PEFT's ``alpha / r`` is 1. ``target_modules`` is an exact regex of the
        covered module paths, so partial layer coverage round-trips too.
        """
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            msg = (
                f"Export folder {str(directory)!r} is not empty. Choose a new folder, or empty it "
                "first; nothing was written."
            )
            raise ExportError(msg)
        tensors: dict[str, torch.Tensor] = {}
        ranks = set()
        for name in self.module_names:
            eff = self.effective(name)
            assert eff is not None
            eff = eff.folded()
            ranks.add(eff.rank)
            tensors[f"base_model.model.{name}.lora_A.weight"] = eff.lora_A.detach().float().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = eff.lora_B.detach().float().contiguous().cpu()
        rank = max(ranks)
        rank_pattern = {}
        if len(ranks) > 1:
            for name in self.module_names:
                eff = self.effective(name)
                assert eff is not None
                if eff.rank != rank:
                    rank_pattern[f"^{_re_escape(name)}$"] = eff.rank
        alpha_pattern = {k: v for k, v in rank_pattern.items()}  # keep alpha == r per module
        import peft

        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or self.provenance.base_model,
            "revision": None,
            "r": rank,
            "lora_alpha": rank,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": "^(" + "|".join(_re_escape(n) for n in self.module_names) + ")$",
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "peft_version": peft.__version__,
        }
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "d2l_provenance": json.dumps(self.provenance.to_dict())}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata=meta)
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        return directory


def compose_adapters(adapters: Iterable[LoRAAdapter]) -> LoRAAdapter:
    """Compose adapters by summing their deltas (rank concatenation); the bias LoRA counts once.

    All adapters must be for the same base model; adapters carrying a bias LoRA must come from the
    same hypernetwork checkpoint (its bias is then applied once).
    """
    adapters = list(adapters)
    if not adapters:
        msg = "compose_adapters needs at least one adapter."
        raise IncompatibleAdapterError(msg)
    if len(adapters) == 1:
        return adapters[0]
    bases = {a.provenance.base_model for a in adapters}
    if len(bases) != 1:
        msg = f"Cannot compose adapters made for different base models: {sorted(bases)}. Use adapters of one base model."
        raise IncompatibleAdapterError(msg)
    with_bias = [a for a in adapters if a.bias]
    checkpoints = {a.provenance.checkpoint_id for a in with_bias}
    if len(checkpoints) > 1:
        msg = (
            f"Cannot compose adapters from different hypernetwork checkpoints {sorted(map(str, checkpoints))}: "
            "their bias LoRAs differ. Re-internalize the documents with one checkpoint."
        )
        raise IncompatibleAdapterError(msg)
    modules = sorted({m for a in adapters for m in a.weights}, key=_natural_key)
    weights = {m: concat_ranks([a.weights[m] for a in adapters if m in a.weights]) for m in modules}
    bias = with_bias[0].bias if with_bias else None
    first = adapters[0].provenance
    methods = {a.provenance.method for a in adapters}
    provenance = AdapterProvenance(
        base_model=first.base_model,
        base_model_revision=first.base_model_revision,
        checkpoint_id=next(iter(checkpoints)) if checkpoints else first.checkpoint_id,
        method=methods.pop() if len(methods) == 1 else "composed",
        source_sha256=tuple(s for a in adapters for s in a.provenance.source_sha256),
        chunk_ids=tuple(c for a in adapters for c in a.provenance.chunk_ids),
        extra=dict(first.extra),
    )
    return LoRAAdapter(weights, provenance, bias)


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in name.replace("-", ".").split(".")]


def _re_escape(name: str) -> str:
    return name.replace(".", r"\.")
