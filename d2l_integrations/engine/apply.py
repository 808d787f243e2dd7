"""Apply LoRA adapters to a frozen base model without mutating shared state.

``use_adapters(model, adapters)`` is a context manager. Inside it, every forward pass of
``model`` *in the current thread or asyncio task* adds each batch row's own LoRA delta:

    y[b] = W x[b] + x[b] @ A_b^T @ B_b^T * scaling_b

Nothing global is changed: inert forward hooks are installed once per target module, and the
active adapters live in a ``contextvars.ContextVar``, so concurrent requests (threads, asyncio
tasks) on one model each see only their own adapters, and an exception restores the previous
state. Outside the context the base model's outputs are bit-identical to a model without hooks.

``merged_adapter(model, adapter)`` is the fast path for many queries on one adapter: it adds the
delta into the weights and restores the exact original tensors on exit (not thread-safe).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from d2l_integrations.engine.lora import LoRAAdapter
from d2l_integrations.errors import IncompatibleAdapterError, UnknownTargetModuleError

_HOOKS_ATTR = "_d2l_lora_hooks"
_OWNERS_ATTR = "_d2l_lora_owners"
_install_lock = threading.Lock()


@dataclass(frozen=True)
class _BatchFactors:
    """Per-module factors of one batch: row b uses lora_A[b] ([R, d_in]) and lora_B[b] ([d_out, R])."""

    lora_A: torch.Tensor  # [batch, R, d_in]
    lora_B: torch.Tensor  # [batch, d_out, R], scaling folded in


@dataclass(frozen=True)
class _ActiveAdapters:
    model_id: int
    batch_size: int
    factors: dict[str, _BatchFactors]


_ACTIVE: ContextVar[_ActiveAdapters | None] = ContextVar("d2l_active_adapters", default=None)


def _lora_hook(name: str, slot: int):  # noqa: ANN202 - torch hook signature
    # A linear shared by two hooked models (a causal LM and its inner decoder) carries one hook per
    # model; each finds its own model in the module's owner list (a plain attribute, so that
    # ``copy.deepcopy`` of a hooked model re-points the copy's hooks at the copy).
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        active = _ACTIVE.get()
        if active is None or active.model_id != id(module.__dict__[_OWNERS_ATTR][slot]):
            return None
        f = active.factors.get(name)
        if f is None:
            return None
        x = args[0]
        lora_A = f.lora_A.to(device=x.device, dtype=x.dtype)
        lora_B = f.lora_B.to(device=x.device, dtype=x.dtype)
        batch = x.shape[0]
        if lora_A.shape[0] == 1 and batch != 1:
            lora_A = lora_A.expand(batch, -1, -1)
            lora_B = lora_B.expand(batch, -1, -1)
        elif lora_A.shape[0] != batch:
            msg = (
                f"Adapters were given for {lora_A.shape[0]} rows but the forward pass has batch size {batch}. "
                "Pass one adapter (or None) per row, or a single adapter for all rows."
            )
            raise IncompatibleAdapterError(msg)
        flat = x.reshape(batch, -1, x.shape[-1])  # (B, T, d_in)
        delta = torch.bmm(torch.bmm(flat, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))  # (B, T, d_out)
        return output + delta.reshape(output.shape)

    return hook


def ensure_hooks(model: nn.Module, module_names: Sequence[str]) -> None:
    """Install the inert LoRA hooks on ``module_names`` of ``model`` (idempotent, thread-safe)."""
    with _install_lock:
        installed: dict[str, object] = model.__dict__.setdefault(_HOOKS_ATTR, {})
        for name in module_names:
            if name in installed:
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                msg = (
                    f"Target module {name!r} does not exist in {type(model).__name__}. "
                    f"Linear modules of layer 0 are: {_linear_names_of_first_layer(model)}."
                )
                raise UnknownTargetModuleError(msg) from None
            if not isinstance(module, nn.Linear):
                msg = f"Target module {name!r} is a {type(module).__name__}, not nn.Linear; LoRA targets must be linear."
                raise UnknownTargetModuleError(msg)
            owners: list[nn.Module] = module.__dict__.setdefault(_OWNERS_ATTR, [])
            owners.append(model)
            installed[name] = module.register_forward_hook(_lora_hook(name, len(owners) - 1))


def remove_hooks(model: nn.Module) -> None:
    """Remove every LoRA hook from ``model`` (only needed to hand the model to other code)."""
    with _install_lock:
        for handle in model.__dict__.pop(_HOOKS_ATTR, {}).values():
            handle.remove()  # type: ignore[attr-defined]


def _linear_names_of_first_layer(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = [n for n in names if ".0." in n]
    return first or names[:10]


def batch_factors(adapters: Sequence[LoRAAdapter | None], device: torch.device) -> dict[str, _BatchFactors]:
    """Per module: every row's effective factors (bias included, scaling folded into B), zero-padded to one rank
    and stacked: ``lora_A [rows, r, d_in]``, ``lora_B [rows, d_out, r]`` in fp32 (None rows stay zero)."""
    modules = sorted({m for a in adapters if a is not None for m in a.module_names})
    factors: dict[str, _BatchFactors] = {}
    for name in modules:
        rows = [a.effective(name) if a is not None else None for a in adapters]
        present = [r for r in rows if r is not None]
        d_in, d_out = present[0].in_features, present[0].out_features
        if any((r.in_features, r.out_features) != (d_in, d_out) for r in present):
            msg = f"Adapters disagree on the shape of {name!r}; they were made for different base models."
            raise IncompatibleAdapterError(msg)
        max_rank = max(r.rank for r in present)
        lora_A = torch.zeros(len(rows), max_rank, d_in, device=device)
        lora_B = torch.zeros(len(rows), d_out, max_rank, device=device)
        for b, r in enumerate(rows):
            if r is None:
                continue
            lora_A[b, : r.rank] = r.lora_A.to(device=device, dtype=torch.float32)
            lora_B[b, :, : r.rank] = r.lora_B.to(device=device, dtype=torch.float32) * r.scaling
        factors[name] = _BatchFactors(lora_A, lora_B)
    return factors


@contextmanager
def use_adapters(
    model: nn.Module,
    adapters: LoRAAdapter | Sequence[LoRAAdapter | None] | None,
) -> Iterator[None]:
    """Apply ``adapters`` to forward passes of ``model`` in this context (thread/task local).

    Args:
        model: the frozen base model.
        adapters: one adapter for every row, a sequence with one adapter (or None) per batch row,
            or None for the plain base model.
    """
    if adapters is None:
        token = _ACTIVE.set(None)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        return
    rows: list[LoRAAdapter | None] = [adapters] if isinstance(adapters, LoRAAdapter) else list(adapters)
    if all(r is None for r in rows):
        with use_adapters(model, None):
            yield
        return
    names = sorted({m for a in rows if a is not None for m in a.module_names})
    ensure_hooks(model, names)
    device = next(model.parameters()).device
    active = _ActiveAdapters(model_id=id(model), batch_size=len(rows), factors=batch_factors(rows, device))
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def merged_adapter(model: nn.Module, adapter: LoRAAdapter) -> Iterator[None]:
    """Add ``adapter``'s delta into the weights; restore the exact original tensors on exit.

    Faster for many queries on one adapter (no per-token LoRA matmuls), but it mutates the
    shared model: do not run other requests on ``model`` concurrently.
    """
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in adapter.module_names:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    msg = f"Target module {name!r} does not exist in {type(model).__name__}."
                    raise UnknownTargetModuleError(msg) from None
                weight = module.weight  # type: ignore[union-attr]
                delta = adapter.delta_weight(name).to(device=weight.device)
                if delta.shape != weight.shape:
                    msg = f"Adapter delta for {name!r} has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}."
                    raise IncompatibleAdapterError(msg)
                originals[name] = weight.detach().clone()
                merged = weight.float() + delta
                if not torch.isfinite(merged).all():
                    msg = f"NaNs or infs in the merged weight of {name!r}: the adapter seems to be broken."
                    raise IncompatibleAdapterError(msg)
                weight.copy_(merged.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_submodule(name).weight.copy_(original)  # type: ignore[union-attr]
