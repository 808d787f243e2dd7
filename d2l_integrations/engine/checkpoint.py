"""Hypernetwork checkpoints: our safetensors folder, and the importer of SakanaAI's pickles.

Our format is a folder::

    hypernetwork.safetensors   the state dict of ``Hypernetwork`` (metadata {"format": "pt"})
    config.json                {"format", "format_version", "hypernetwork": HypernetworkConfig.to_dict(),
                                "metadata": {checkpoint_id, base_model, base_model_revision, data_summary,
                                             eval, prefer_over_distill, d2l_integrations_version, source}}

``checkpoint_id`` is derived from the sha256 of the tensors and the architecture, so two folders
with the same weights have the same id (it keys adapter stores).

SakanaAI publishes ``pytorch_model.bin``: a torch zip pickle of ``ModulatedPretrainedModel.state_dict()``
whose tensors sit beside three config objects of their own classes. ``import_sakana_checkpoint``
reads it with torch's restricted (``weights_only``) unpickler, mapping those classes to inert
stand-ins; anything else in the pickle is refused unless the caller passes ``trust_pickle=True``.
Their tensor names are ours (see ``hypernetwork.py``) except for the renames in ``sakana_to_ours``.

Example:
    >>> net = import_sakana_checkpoint("pytorch_model.bin")
    >>> save_checkpoint(net, "checkpoints/gemma-d2l")
    >>> net = load_checkpoint("checkpoints/gemma-d2l", base)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2l_integrations.engine.atomic import atomic_folder
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.hypernetwork import Hypernetwork, HypernetworkInternalizer, check_base_shapes
from d2l_integrations.errors import (
    CheckpointNotFoundError,
    ExportError,
    IncompatibleCheckpointError,
    UntrustedCheckpointError,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "hypernetwork.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "d2l_integrations.hypernetwork"
FORMAT_VERSION = 1


def _our_version() -> str:
    try:
        return version("d2l-integrations")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- our format


def _preference(value: Any) -> bool | dict[str, bool]:
    """``prefer_over_distill`` as stored: a bool, or ``{device type: bool}``."""
    if isinstance(value, Mapping):
        return {str(k): bool(v) for k, v in value.items()}
    return bool(value)


def compute_checkpoint_id(state_dict: Mapping[str, torch.Tensor], config: HypernetworkConfig) -> str:
    """``d2l-`` + 16 hex digits of the sha256 over the architecture and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    arch = {k: v for k, v in config.to_dict().items() if k not in ("base_model", "base_model_revision")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"d2l-{h.hexdigest()[:16]}"


def save_checkpoint(
    hypernetwork: Hypernetwork,
    directory: str | os.PathLike[str],
    *,
    data_summary: Mapping[str, Any] | None = None,
    eval_table: Any = None,
    source: str | None = None,
    prefer_over_distill: bool | Mapping[str, bool] = False,
    overwrite: bool = False,
) -> Path:
    """Write ``hypernetwork.safetensors`` + ``config.json`` atomically into ``directory``.

    Args:
        hypernetwork: the network to save; its ``checkpoint_id`` is set to the saved id.
        directory: target folder; must be absent or empty unless ``overwrite``.
        data_summary: what it was trained on (JSON-serialisable), for the record.
        eval_table: evaluation results (JSON-serialisable), for the record.
        source: where the weights came from (e.g. the imported file), for the record.
        prefer_over_distill: held-out evals showed it beats gradient distillation, so
            ``D2LEngine.internalizer("auto")`` picks it. A mapping decides per device type
            (``{"cpu": True, "cuda": False}``), since distillation's default settings and cost
            differ by device (``DistillConfig.for_device``); a missing device type means False.
        overwrite: replace an existing non-empty folder.

    Returns:
        The folder written.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        msg = f"Checkpoint folder {str(directory)!r} is not empty. Choose a new folder or pass overwrite=True."
        raise ExportError(msg)
    state = {k: v.detach().contiguous().cpu() for k, v in hypernetwork.state_dict().items()}
    config = hypernetwork.config
    checkpoint_id = compute_checkpoint_id(state, config)
    document = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "hypernetwork": config.to_dict(),
        "metadata": {
            "checkpoint_id": checkpoint_id,
            "base_model": config.base_model,
            "base_model_revision": config.base_model_revision,
            "data_summary": dict(data_summary) if data_summary is not None else None,
            "eval": eval_table,
            "source": source,
            "prefer_over_distill": _preference(prefer_over_distill),
            "d2l_integrations_version": _our_version(),
        },
    }
    _write_folder_atomically(directory, state, document)
    hypernetwork.checkpoint_id = checkpoint_id
    return directory


def _write_folder_atomically(directory: Path, state: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
    with atomic_folder(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "checkpoint_id": document["metadata"]["checkpoint_id"]})
        (tmp / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))


def read_checkpoint_config(directory: str | os.PathLike[str]) -> tuple[HypernetworkConfig, dict[str, Any]]:
    """The ``HypernetworkConfig`` and metadata of a checkpoint folder, without loading tensors."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        msg = (
            f"No hypernetwork checkpoint at {str(directory)!r}: expected {CONFIG_NAME} and {WEIGHTS_NAME}. "
            "Pass a folder written by save_checkpoint(), or import SakanaAI's pytorch_model.bin with "
            "import_sakana_checkpoint()."
        )
        raise CheckpointNotFoundError(msg)
    document = json.loads(path.read_text())
    if document.get("format") != CHECKPOINT_FORMAT:
        msg = f"{str(path)!r} is not a d2l_integrations hypernetwork checkpoint (format={document.get('format')!r})."
        raise IncompatibleCheckpointError(msg)
    if int(document.get("format_version", 0)) > FORMAT_VERSION:
        msg = (
            f"Checkpoint format version {document['format_version']} is newer than this library supports "
            f"({FORMAT_VERSION}). Upgrade d2l-integrations."
        )
        raise IncompatibleCheckpointError(msg)
    return HypernetworkConfig.from_dict(document["hypernetwork"]), dict(document.get("metadata") or {})


def load_checkpoint(
    directory: str | os.PathLike[str],
    base: Any | None = None,
    *,
    device: str | torch.device = "cpu",
    allow_other_base: bool = False,
) -> Hypernetwork:
    """Load a checkpoint folder; refuse one made for another base model than ``base``.

    Args:
        directory: folder written by ``save_checkpoint``.
        base: the loaded ``BaseModel``; when given, its name/revision and layer/width shapes must
            match the checkpoint's.
        device: where to put the weights.
        allow_other_base: accept a base whose name and revision differ (same shapes still required),
            e.g. the same weights saved under another folder name.
    """
    config, metadata = read_checkpoint_config(directory)
    if base is not None:
        check_compatible(config, base, allow_other_base=allow_other_base, checkpoint=str(directory))
    state = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(device))
    hypernetwork = _build(config, state, source=str(directory))
    hypernetwork.checkpoint_id = metadata.get("checkpoint_id") or compute_checkpoint_id(state, config)
    return hypernetwork.to(device)


def load_internalizer(
    path: str | os.PathLike[str],
    base: Any,
    *,
    allow_other_base: bool = False,
    trust_pickle: bool = False,
    max_batch_size: int = 8,
) -> HypernetworkInternalizer:
    """A ready ``HypernetworkInternalizer`` for ``base`` from our folder or SakanaAI's ``pytorch_model.bin``.

    The hypernetwork is checked against ``base`` (see ``check_compatible``) and moved to its
    device. ``internalizer.prefer_over_distill`` and ``internalizer.metadata`` come from the
    checkpoint's metadata (an imported pickle has none, so it is not preferred).
    """
    path = Path(path)
    if path.is_file():
        hypernetwork = import_sakana_checkpoint(path, trust_pickle=trust_pickle)
        check_compatible(hypernetwork.config, base, allow_other_base=allow_other_base, checkpoint=str(path))
        metadata: dict[str, Any] = {"checkpoint_id": hypernetwork.checkpoint_id, "source": f"sakana:{path.name}"}
    else:
        hypernetwork = load_checkpoint(path, base, allow_other_base=allow_other_base)
        metadata = read_checkpoint_config(path)[1]
    internalizer = HypernetworkInternalizer(hypernetwork.to(base.device), max_batch_size=max_batch_size)
    internalizer.prefer_over_distill = _preference(metadata.get("prefer_over_distill", False))
    internalizer.metadata = metadata
    return internalizer


def _build(config: HypernetworkConfig, state: Mapping[str, torch.Tensor], *, source: str) -> Hypernetwork:
    with torch.device("meta"):  # no random init: every parameter comes from ``state``
        hypernetwork = Hypernetwork(config)
    expected = hypernetwork.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        msg = (
            f"Checkpoint {source!r} does not fit its own config: missing keys {missing}, unexpected keys {unexpected}. "
            "The file is damaged or was written by an incompatible version."
        )
        raise IncompatibleCheckpointError(msg)
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        msg = f"Checkpoint {source!r} has tensors of the wrong shape for its config: {wrong}."
        raise IncompatibleCheckpointError(msg)
    hypernetwork.load_state_dict(dict(state), strict=True, assign=True)
    return hypernetwork.eval()


def check_compatible(config: HypernetworkConfig, base: Any, *, allow_other_base: bool = False, checkpoint: str = "") -> None:
    """Raise ``IncompatibleCheckpointError`` unless ``config`` was made for ``base``.

    Shapes (layers, hidden size, target module dims) must always match. Names must match too, or
    the revisions must be known and equal, unless ``allow_other_base``.
    """
    check_base_shapes(config, base)
    same_revision = config.base_model_revision is not None and config.base_model_revision == base.revision
    if config.base_model == base.name or same_revision or allow_other_base:
        if config.base_model == base.name and config.base_model_revision and base.revision and not same_revision:
            logger.warning(
                "Checkpoint %s was made for %s revision %s; the loaded revision is %s.",
                checkpoint, base.name, config.base_model_revision, base.revision,
            )
        return
    msg = (
        f"Checkpoint {checkpoint!r} was trained for base model {config.base_model!r} (revision "
        f"{config.base_model_revision}), but {base.name!r} (revision {base.revision}) is loaded. Load "
        f"{config.base_model!r}, or pass allow_other_base=True if {base.name!r} has the same weights."
    )
    raise IncompatibleCheckpointError(msg)


# ----------------------------------------------------------------------------- SakanaAI pickles


class _ConfigStandIn:
    """Attribute bag: a pickled dataclass's state lands in ``__dict__``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class _EnumStandIn(str):
    """A pickled ``str`` enum (``PeftType("LORA")``) unpickles as its plain value."""


_CONFIG_CLASSES = {
    "ctx_to_lora.modeling.hypernet.HypernetConfig": "HypernetConfig",
    "ctx_to_lora.modeling.aggregator.AggregatorConfig": "AggregatorConfig",
    "ctx_to_lora.configs.CtxEncoderArguments": "CtxEncoderArguments",
    "peft.tuners.lora.config.LoraConfig": "LoraConfig",
    "peft.tuners.lora.config.LoraRuntimeConfig": "LoraRuntimeConfig",
}
_ENUM_CLASSES = {
    "peft.utils.peft_types.PeftType": "PeftType",
    "peft.utils.peft_types.TaskType": "TaskType",
    "ctx_to_lora.modeling.aggregator.AGGREGATOR_TYPE": "AGGREGATOR_TYPE",
    "ctx_to_lora.modeling.ctx_encoder.CTX_ENCODER_TYPE": "CTX_ENCODER_TYPE",
}


def _stand_ins() -> dict[str, type]:
    """Path -> stand-in class; the old module ``ctx_to_lora.modeling_utils`` is aliased too."""
    classes: dict[str, type] = {}
    for path, name in _CONFIG_CLASSES.items():
        classes[path] = type(name, (_ConfigStandIn,), {"__module__": __name__})
    for path, name in _ENUM_CLASSES.items():
        classes[path] = type(name, (_EnumStandIn,), {"__module__": __name__})
    for path in list(classes):
        if path.startswith("ctx_to_lora."):
            classes[f"ctx_to_lora.modeling_utils.{path.rsplit('.', 1)[1]}"] = classes[path]
    return classes


_STAND_INS = _stand_ins()
_ALLOWED_BUILTINS = {"__builtin__.set", "builtins.set"}


def load_sakana_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Any]:
    """Unpickle a SakanaAI ``pytorch_model.bin`` on CPU; refuse unknown objects unless trusted.

    Their config classes become attribute bags, their enums plain strings. With
    ``trust_pickle=True`` the file is read with full pickle (arbitrary code can run: only for
    files you trust); the stand-ins still apply, so ``ctx_to_lora`` need not be installed.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"No SakanaAI checkpoint at {str(path)!r}. Pass the path of their pytorch_model.bin."
        raise CheckpointNotFoundError(msg)
    _check_is_torch_file(path)
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_trusting_pickle_module())  # type: ignore[no-any-return]
    unknown = sorted(set(_globals_in(path)) - set(_STAND_INS) - _ALLOWED_BUILTINS)
    if unknown:
        raise _untrusted(path, unknown)
    safe = [(cls, name) for name, cls in _STAND_INS.items()] + [set]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.findall(r"GLOBAL ([\w.]+)", text) or [ln.strip() for ln in text.splitlines() if "Unsupported" in ln]
        raise _untrusted(path, found or [text.splitlines()[0]]) from exc
    except RuntimeError as exc:
        raise _not_a_checkpoint(path, exc) from exc


def _check_is_torch_file(path: Path) -> None:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a legacy pickle (protocol byte 0x80)."""
    with open(path, "rb") as fh:
        head = fh.read(1)
    if not zipfile.is_zipfile(path) and head != b"\x80":
        raise _not_a_checkpoint(path, "neither a zip archive nor a pickle")


def _not_a_checkpoint(path: Path, reason: object) -> IncompatibleCheckpointError:
    msg = f"{str(path)!r} is not a readable torch checkpoint ({reason}). Pass SakanaAI's pytorch_model.bin."
    return IncompatibleCheckpointError(msg)


def _globals_in(path: Path) -> list[str]:
    """Globals a zip checkpoint's pickle names (legacy non-zip files: none listed, the loader still checks)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (RuntimeError, ValueError, pickle.UnpicklingError):
        return []


def _untrusted(path: Path, found: list[str]) -> UntrustedCheckpointError:
    msg = (
        f"{str(path)!r} holds pickled objects the restricted loader does not allow: {found}. A SakanaAI "
        "D2L checkpoint holds only tensors and its config classes. If you trust this file, pass "
        "trust_pickle=True to load it with full pickle (which can run arbitrary code)."
    )
    return UntrustedCheckpointError(msg)


def _trusting_pickle_module() -> SimpleNamespace:
    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            stand_in = _STAND_INS.get(f"{module}.{name}")
            return stand_in if stand_in is not None else super().find_class(module, name)

    return SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="pickle")


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _refuse(message: str) -> IncompatibleCheckpointError:
    return IncompatibleCheckpointError(
        f"This SakanaAI checkpoint uses an architecture d2l_integrations does not implement: {message}. "
        "Supported: the published recipe (Perceiver aggregator, per-rank generation, per-layer processing, "
        "per-layer activation features of the base model itself)."
    )


def sakana_config(state: Mapping[str, Any], *, base_model: str | None = None) -> HypernetworkConfig:
    """Our ``HypernetworkConfig`` from their ``hypernet_config``/``ctx_encoder_args``; refuse what we don't implement."""
    hc, enc = state.get("hypernet_config"), state.get("ctx_encoder_args")
    if hc is None:
        msg = "The pickle has no `hypernet_config` entry: it is not a SakanaAI D2L checkpoint (ModulatedPretrainedModel.state_dict())."
        raise IncompatibleCheckpointError(msg)
    try:
        return _derive_config(state, hc, enc, base_model)
    except IncompatibleCheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        msg = f"The checkpoint's hypernet_config lacks a field or has an unexpected value ({exc!r}); it is not a D2L checkpoint we can read."
        raise IncompatibleCheckpointError(msg) from exc


def _derive_config(state: Mapping[str, Any], hc: Any, enc: Any, base_model: str | None) -> HypernetworkConfig:
    lora, agg = _attr(hc, "lora_config"), _attr(hc, "aggregator_config")
    _check_supported(hc, agg, lora, enc)
    d_in, d_out = _attr(hc, "feature_sizes")
    modules = tuple(sorted(_attr(lora, "target_modules")))  # the reference sorts its target modules
    layer_indices = [int(i) for i in torch.as_tensor(_attr(hc, "layer_indices")).tolist()]
    num_layers = int(_attr(agg, "num_layers"))
    if layer_indices != list(range(num_layers)):
        raise _refuse(f"LoRAs for a subset of layers (layer_indices={layer_indices})")
    q_rows, kv_rows = _attention_rows(state)
    head_dim = 128  # hard-coded in the reference (16 heads x 128, 4 KV heads)
    return HypernetworkConfig(
        num_layers=num_layers,
        hidden_size=int(_attr(hc, "base_hidden_size")),
        module_dims=tuple((m, int(d_in[m]), int(d_out[m])) for m in modules),
        rank=int(_attr(lora, "r")),
        lora_alpha=float(_attr(lora, "lora_alpha")),
        latent_size=int(_attr(hc, "latent_size")),
        num_latents=int(_attr(agg, "n_latent_queries")),
        num_blocks=int(_attr(agg, "num_blocks")),
        num_heads=q_rows // head_dim,
        num_kv_heads=kv_rows // head_dim,
        head_dim=head_dim,
        num_pre_head_layers=int(_attr(hc, "num_pre_head_layers")),
        use_bias_lora=bool(_attr(hc, "use_bias")),
        context_format="chat",
        base_model=base_model or str(state.get("base_model_name_or_path") or _attr(lora, "base_model_name_or_path") or "unknown"),
    )


def _attention_rows(state: Mapping[str, Any]) -> tuple[int, int]:
    prefix = "aggregator.perceiver.encoder.layers.0.self_attn"
    try:
        return int(state[f"{prefix}.q_proj.weight"].shape[0]), int(state[f"{prefix}.k_proj.weight"].shape[0])
    except KeyError:
        raise _refuse(f"no `{prefix}.q_proj.weight` tensor (not a Perceiver aggregator)") from None


def _check_supported(hc: Any, agg: Any, lora: Any, enc: Any) -> None:
    checks = [
        (str(_attr(agg, "aggregator_type")) == "perceiver", f"aggregator_type={_attr(agg, 'aggregator_type')!r}"),
        (bool(_attr(hc, "per_rank_gen")) and bool(_attr(agg, "per_rank_gen", True)), "per_rank_gen=False"),
        (bool(_attr(hc, "per_layer_processing")), "per_layer_processing=False"),
        (not _attr(hc, "use_light_weight_lora", False), "use_light_weight_lora=True"),
        (not _attr(hc, "use_per_rank_bias", False), "use_per_rank_bias=True"),
        (not _attr(hc, "use_token_mixing", False), "use_token_mixing=True"),
        (not _attr(hc, "extra_modules"), f"extra_modules={_attr(hc, 'extra_modules')!r}"),
        (int(_attr(agg, "num_self_attn_per_block", 0)) == 0, "self-attention blocks in the Perceiver"),
        (not _attr(agg, "shared_weights", False), "shared Perceiver block weights"),
        (bool(_attr(agg, "layer_to_layer_ctx_encoder", True)), "layer_to_layer_ctx_encoder=False"),
        (not _attr(lora, "use_dora", False), "DoRA"),
    ]
    if enc is not None:
        checks += [
            (str(_attr(enc, "ctx_encoder_type")) == "per_layer_activations", f"ctx_encoder_type={_attr(enc, 'ctx_encoder_type')!r}"),
            (_attr(enc, "ctx_encoder_model_name_or_path") is None, "a separate context-encoder model"),
            (_attr(enc, "ctx_encoder_last_layer") is None, f"ctx_encoder_last_layer={_attr(enc, 'ctx_encoder_last_layer')!r}"),
        ]
    for ok, what in checks:
        if not ok:
            raise _refuse(what)


_EINMIX_BIAS = re.compile(r"^layers\.\d+\.layers\.[13]\.bias$")


def sakana_to_ours(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Their tensor names and shapes onto ours. All other keys are copied unchanged.

    - ``aggregator.perceiver.*`` -> ``perceiver.*`` (we have no aggregator wrapper);
    - ``layers.{i}.layers.{1,3}.bias`` (EinMix) ``[1, L, 1, 1, d]`` -> ``[L, d]``;
    - ``head.weight`` ``[L, D, d_lora]`` (one module) -> ``[L, 1, D, d_lora]``.
    """
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # the three config entries
        name = key.removeprefix("aggregator.")
        if _EINMIX_BIAS.match(name):
            value = value.reshape(value.shape[1], value.shape[-1])
        elif name == "head.weight" and value.dim() == 3:
            value = value.unsqueeze(1)
        ours[name] = value.float() if value.is_floating_point() else value
    return ours


def import_sakana_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    base_model: str | None = None,
) -> Hypernetwork:
    """Load SakanaAI's published ``pytorch_model.bin`` as our ``Hypernetwork`` (fp32, CPU).

    Args:
        path: their ``pytorch_model.bin``.
        trust_pickle: read it with full pickle (only for files you trust); otherwise anything but
            tensors and their config classes is refused with ``UntrustedCheckpointError``.
        base_model: name to record as the base model (default: the checkpoint's
            ``base_model_name_or_path``, e.g. ``google/gemma-2-2b-it``).
    """
    state = load_sakana_state_dict(path, trust_pickle=trust_pickle)
    config = sakana_config(state, base_model=base_model)
    ours = sakana_to_ours(state)
    hypernetwork = _build(config, ours, source=str(path))
    hypernetwork.checkpoint_id = compute_checkpoint_id(hypernetwork.state_dict(), config)
    return hypernetwork


def convert_sakana_checkpoint(
    path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write SakanaAI's ``pytorch_model.bin`` as our safetensors checkpoint folder.

    Example:
        >>> convert_sakana_checkpoint("gemma_d2l/pytorch_model.bin", "checkpoints/gemma-d2l")
    """
    hypernetwork = import_sakana_checkpoint(path, trust_pickle=trust_pickle, base_model=base_model)
    if base_model_revision is not None:
        hypernetwork.config = replace(hypernetwork.config, base_model_revision=base_model_revision)
    return save_checkpoint(hypernetwork, directory, source=f"sakana:{Path(path).name}", overwrite=overwrite)


__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "check_compatible",
    "compute_checkpoint_id",
    "convert_sakana_checkpoint",
    "import_sakana_checkpoint",
    "load_checkpoint",
    "load_internalizer",
    "load_sakana_state_dict",
    "read_checkpoint_config",
    "sakana_config",
    "sakana_to_ours",
    "save_checkpoint",
]
