"""`D2LEngine`: internalize documents into LoRA adapters and generate with them.

    engine = D2LEngine.default()                       # embedded SmolLM2-135M-Instruct, offline
    adapter = engine.internalize("The Zorblax Institute was founded in 1873 by Mira Quell.")
    engine.generate([{"role": "user", "content": "Who founded the Zorblax Institute?"}]).text
    engine.reset()                                     # the knowledge is gone

Stateless use passes adapters explicitly (``adapters=...``); then nothing is stored on the engine,
and concurrent calls (threads, asyncio tasks) never see each other's adapters.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel, Message, cache_kwarg, load_base_model
from d2l_integrations.engine.config import DEFAULT_BASE_MODEL, GenerationConfig
from d2l_integrations.engine.lora import LoRAAdapter, compose_adapters
from d2l_integrations.errors import (
    ConfigError,
    ContextLengthError,
    HypernetworkUnavailableError,
    InvalidDocumentError,
    InvalidMessagesError,
)

logger = logging.getLogger(__name__)

METHODS: Final = ("auto", "hypernetwork", "distill", "refine")
DEFAULT_CHUNK_TOKENS: Final = 384
"""Chunk length for internalization: fits the hypernetwork's training documents (128-512 tokens)."""


class _Active:
    """Sentinel: use the engine's active (internalized) adapter."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE: Final = _Active()
AdapterArg = LoRAAdapter | None | _Active


@dataclass(frozen=True)
class Generation:
    """One generated answer with its cost.

    Attributes:
        text: the answer, stop strings excluded.
        token_ids: generated token ids (stop-string tokens included, EOS excluded).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated.
        finish_reason: ``"stop"`` (EOS or a stop string) or ``"length"``.
        mean_logprob: mean log-probability of the generated tokens under the model (a confidence signal).
        timings: seconds: ``prefill_s``, ``first_token_s``, ``decode_s``, ``total_s``.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    mean_logprob: float
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenEvent:
    """A streamed text delta. The final event has ``generation`` set (and may have empty text)."""

    text: str
    token_id: int | None
    generation: Generation | None = None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class D2LEngine:
    """Internalize documents into LoRA adapters of a frozen LLM, and generate with them.

    Args:
        base: the frozen base model.
        hypernetwork: a trained hypernetwork internalizer for ``base`` (None when no checkpoint exists).
        distill_config: settings of the gradient (context-distillation) internalizer; default
            ``DistillConfig.for_device(base.device)`` (the measured GPU preset on CUDA, the CPU defaults elsewhere).
    """

    def __init__(self, base: BaseModel, hypernetwork: Any | None = None, *, distill_config: Any | None = None) -> None:
        self.base = base
        self.hypernetwork = hypernetwork
        self._distill_config = distill_config
        self._distill: Any | None = None
        self._refine: Any | None = None
        self._active: LoRAAdapter | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls, *, device: str | torch.device | None = None, dtype: str | torch.dtype = "auto") -> D2LEngine:
        """The embedded default: SmolLM2-135M-Instruct plus the shipped hypernetwork checkpoint, if any.

        No download happens. When no trained checkpoint ships for the default model, the engine
        has ``hypernetwork=None`` and ``internalize(method="auto")`` uses the gradient
        (``distill``) internalizer; ``method="hypernetwork"`` raises
        ``HypernetworkUnavailableError`` saying how to get one.
        """
        base = load_base_model(DEFAULT_BASE_MODEL, device=device, dtype=dtype)
        shipped = shipped_checkpoint_path(base.name)
        hypernetwork = _load_hypernetwork(shipped, base) if shipped is not None else None
        return cls(base, hypernetwork)

    @classmethod
    def from_pretrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        checkpoint: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
    ) -> D2LEngine:
        """Any Hugging Face causal LM (id or folder, or a .gguf) plus an optional hypernetwork checkpoint.

        Args:
            base_model: ``"default"``, a hub id, a local folder, or a ``.gguf`` file.
            checkpoint: a folder in our format, or a SakanaAI ``pytorch_model.bin`` (imported with a
                restricted unpickler).
        """
        base = load_base_model(base_model, device=device, dtype=dtype)
        hypernetwork = _load_hypernetwork(Path(checkpoint), base) if checkpoint is not None else None
        return cls(base, hypernetwork)

    # ------------------------------------------------------------------ internalization
    @property
    def active_adapter(self) -> LoRAAdapter | None:
        return self._active

    def internalizer(self, method: str = "auto") -> Any:
        """The internalizer for ``method``: ``auto``, ``hypernetwork``, ``distill`` or ``refine``.

        ``auto`` picks the hypernetwork only when a checkpoint is loaded and its recorded held-out
        quality beats the distill path on this device type (``prefer_over_distill`` in its metadata,
        a bool or ``{"cpu": ..., "cuda": ...}``); otherwise distill. ``refine`` (never picked by
        ``auto``) is the hypernetwork's adapter with distillation trained on top of it
        (``engine/refine.py``), with the same distillation settings as ``distill``.
        """
        if method not in METHODS:
            msg = f"Unknown internalization method {method!r}. Choose one of {list(METHODS)}."
            raise ConfigError(msg)
        if method in ("hypernetwork", "refine") or (method == "auto" and self._hypernetwork_preferred()):
            if self.hypernetwork is None:
                msg = (
                    f"No trained hypernetwork checkpoint is loaded for base model {self.base.name!r}, and "
                    f"method={method!r} needs one. Use method='distill' (gradient internalization, works for every "
                    "base model), load one with D2LEngine.from_pretrained(base_model, checkpoint=...), or train one "
                    "with `d2l train`."
                )
                raise HypernetworkUnavailableError(msg)
            if method != "refine":
                return self.hypernetwork
        with self._lock:
            if self._distill is None:
                from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer

                self._distill = DistillInternalizer(self._distill_config or DistillConfig.for_device(self.base.device))
            if method != "refine":
                return self._distill
            if self._refine is None:
                from d2l_integrations.engine.refine import RefineInternalizer

                self._refine = RefineInternalizer(self.hypernetwork, self._distill.config,
                                                  share_teacher_prefix=self._distill.share_teacher_prefix)
            return self._refine

    def _hypernetwork_preferred(self) -> bool:
        if self.hypernetwork is None:
            return False
        preferred = getattr(self.hypernetwork, "prefer_over_distill", False)
        if isinstance(preferred, Mapping):  # per device type: distill's settings and cost differ by device
            return bool(preferred.get(self.base.device.type, False))
        return bool(preferred)

    def chunk(self, text: str, *, chunk_tokens: int | None = None, overlap_tokens: int = 0) -> list[str]:
        """Split ``text`` into chunks of at most ``chunk_tokens`` tokens (exact substrings of ``text``).

        Raises:
            InvalidDocumentError: empty, whitespace-only, or non-text input.
        """
        text = validate_document(text)
        size = chunk_tokens or DEFAULT_CHUNK_TOKENS
        if size < 8 or not 0 <= overlap_tokens < size:
            msg = f"chunk_tokens must be >= 8 and 0 <= overlap_tokens < chunk_tokens; got {size} and {overlap_tokens}."
            raise ConfigError(msg)
        chunks: list[str] = []
        # Tokenize in ~200k-character windows so a 1M-character document stays in bounded memory.
        window = 200_000
        start_char = 0
        while start_char < len(text):
            end_char = min(len(text), start_char + window)
            if end_char < len(text):  # cut the window at whitespace so no word is split
                cut = text.rfind(" ", start_char + window // 2, end_char)
                end_char = cut if cut > start_char else end_char
            piece = text[start_char:end_char]
            enc = self.base.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            i = 0
            while i < len(offsets):
                j = min(len(offsets), i + size)
                lo, hi = offsets[i][0], offsets[j - 1][1]
                chunk = piece[lo:hi].strip()
                if chunk:
                    chunks.append(chunk)
                if j == len(offsets):
                    break
                i = j - overlap_tokens
            start_char = end_char
        if not chunks:
            msg = "The document has no tokens after tokenization. Pass non-empty text."
            raise InvalidDocumentError(msg)
        return chunks

    def internalize_chunks(
        self,
        chunks: Sequence[str],
        *,
        method: str = "auto",
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        """One adapter per chunk (not composed). Each chunk must fit ``chunk_tokens``; use ``chunk`` first."""
        chunks = [validate_document(c) for c in chunks]
        if chunk_ids is not None and len(chunk_ids) != len(chunks):
            msg = f"Got {len(chunk_ids)} chunk_ids for {len(chunks)} chunks; pass one id per chunk."
            raise ConfigError(msg)
        internalizer = self.internalizer(method)
        return list(internalizer.internalize_chunks(self.base, chunks, chunk_ids=chunk_ids, progress=progress))

    def internalize(
        self,
        document: str | Sequence[str],
        *,
        method: str = "auto",
        chunk_tokens: int | None = None,
        activate: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> LoRAAdapter:
        """Internalize a document (or several) into one adapter: chunked, one adapter per chunk, summed.

        With ``activate=True`` the adapter is added to the engine's active knowledge, used by
        ``generate`` until ``reset()``. Returns the new document's adapter either way.
        """
        documents = [document] if isinstance(document, str) else list(document)
        if not documents:
            msg = "internalize() got an empty list of documents. Pass at least one non-empty text."
            raise InvalidDocumentError(msg)
        chunks = [c for d in documents for c in self.chunk(d, chunk_tokens=chunk_tokens)]
        adapters = self.internalize_chunks(chunks, method=method, progress=progress)
        adapter = compose_adapters(adapters)
        if activate:
            with self._lock:
                self._active = adapter if self._active is None else compose_adapters([self._active, adapter])
        return adapter

    def reset(self) -> None:
        """Forget everything internalized into the engine's active adapter."""
        with self._lock:
            self._active = None

    # ------------------------------------------------------------------ generation
    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)

    def generate(self, messages: Sequence[Message], *, adapters: AdapterArg = ACTIVE, **settings: Any) -> Generation:
        """Answer a chat conversation, with ``adapters`` applied (default: the active adapter).

        Keyword settings: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``.
        """
        final: Generation | None = None
        for event in self.stream(messages, adapters=adapters, **settings):
            final = event.generation or final
        assert final is not None
        return final

    def stream(self, messages: Sequence[Message], *, adapters: AdapterArg = ACTIVE, **settings: Any) -> Iterator[TokenEvent]:
        """Like ``generate`` but yields text deltas token by token; the last event carries the ``Generation``."""
        gen_cfg = _generation_config(settings)
        prompt = self._prompt_ids(messages, gen_cfg)
        adapter = self._resolve(adapters)
        # Step the decoder inside a context of its own: two streams advanced alternately in one
        # thread must not see (or reset) each other's active adapters.
        context = contextvars.copy_context()
        decoder = self._decode([prompt], [adapter], gen_cfg, stream_row=0)
        while True:
            try:
                event = context.run(next, decoder)
            except StopIteration:
                return
            yield event

    def generate_batch(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        adapters: Sequence[AdapterArg] | AdapterArg = ACTIVE,
        **settings: Any,
    ) -> list[Generation]:
        """Answer several conversations in one batch; each row may carry its own adapter."""
        if not conversations:
            return []
        gen_cfg = _generation_config(settings)
        rows = (
            [self._resolve(a) for a in adapters]
            if isinstance(adapters, Sequence) and not isinstance(adapters, LoRAAdapter)
            else [self._resolve(adapters)] * len(conversations)  # type: ignore[arg-type]
        )
        if len(rows) != len(conversations):
            msg = f"Got {len(rows)} adapters for {len(conversations)} conversations; pass one (or None) per row."
            raise ConfigError(msg)
        prompts = [self._prompt_ids(c, gen_cfg) for c in conversations]
        results: list[Generation | None] = [None] * len(prompts)
        for event_row, event in self._decode_batch(prompts, rows, gen_cfg):
            results[event_row] = event
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def score(self, messages: Sequence[Message], response: str, *, adapters: AdapterArg = None) -> float:
        """Mean log-probability of ``response`` as the assistant's answer to ``messages``."""
        prompt = self._prompt_ids(messages, GenerationConfig(max_new_tokens=1))
        response_ids = self.base.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            return 0.0
        ids = torch.tensor([prompt + response_ids], device=self.base.device)
        with use_adapters(self.base.model, self._resolve(adapters)):
            logits = self.base.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(response_ids, device=logprobs.device)
        return float(logprobs.gather(1, target[:, None]).mean())

    # ------------------------------------------------------------------ internals
    def _resolve(self, adapters: AdapterArg) -> LoRAAdapter | None:
        adapter = self._active if isinstance(adapters, _Active) else adapters
        if adapter is not None and adapter.provenance.base_model != self.base.name:
            from d2l_integrations.errors import IncompatibleAdapterError

            msg = (
                f"The adapter was made for base model {adapter.provenance.base_model!r}, but this engine runs "
                f"{self.base.name!r}. Re-internalize the document with this engine, or load {adapter.provenance.base_model!r}."
            )
            raise IncompatibleAdapterError(msg)
        return adapter

    def _prompt_ids(self, messages: Sequence[Message], gen_cfg: GenerationConfig) -> list[int]:
        validate_messages(messages)
        ids = self.base.chat_ids(messages)
        limit = self.base.context_window
        if len(ids) + gen_cfg.max_new_tokens > limit:
            msg = (
                f"The prompt has {len(ids)} tokens; with max_new_tokens={gen_cfg.max_new_tokens} it exceeds the "
                f"model's context window of {limit}. Internalize long documents instead of putting them in the "
                "prompt, retrieve fewer chunks, or lower max_new_tokens."
            )
            raise ContextLengthError(msg)
        return ids

    def _decode(
        self, prompts: list[list[int]], adapters: list[LoRAAdapter | None], cfg: GenerationConfig, stream_row: int
    ) -> Iterator[TokenEvent]:
        for row, item in self._decode_batch(prompts, adapters, cfg, stream=True):
            if row == stream_row:
                yield item  # type: ignore[misc]

    @torch.inference_mode()
    def _decode_batch(
        self,
        prompts: list[list[int]],
        adapters: list[LoRAAdapter | None],
        cfg: GenerationConfig,
        *,
        stream: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """Left-padded batched decoding with a KV cache. Yields (row, TokenEvent) while streaming and
        (row, Generation) for each row when it finishes."""
        from transformers import DynamicCache

        model, tok = self.base.model, self.base.tokenizer
        device = self.base.device
        n = len(prompts)
        width = max(len(p) for p in prompts)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = set(self.base.eos_token_ids)
        generator = None
        if cfg.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(cfg.seed if cfg.seed is not None else int(time.time_ns() % (2**31)))
        out_ids: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        texts = [""] * n
        done = [False] * n
        finish = ["length"] * n
        t0 = time.perf_counter()
        first_token_s = 0.0
        prefill_s = 0.0
        cache = DynamicCache(config=model.config)
        cache_arg = {cache_kwarg(model): cache}
        step_ids, step_pos, step_mask = input_ids, positions, mask
        with use_adapters(model, adapters):
            for step in range(cfg.max_new_tokens):
                logits = model(
                    input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, use_cache=True, **cache_arg
                ).logits[:, -1, :].float()
                if step == 0:
                    prefill_s = time.perf_counter() - t0
                logprobs = torch.log_softmax(logits, dim=-1)
                next_ids = _pick(logits, cfg, generator)
                chosen = logprobs.gather(1, next_ids[:, None])[:, 0]
                if step == 0:
                    first_token_s = time.perf_counter() - t0
                for i in range(n):
                    if done[i]:
                        continue
                    token = int(next_ids[i])
                    if token in eos:
                        done[i], finish[i] = True, "stop"
                    else:
                        out_ids[i].append(token)
                        logps[i].append(float(chosen[i]))
                        full = tok.decode(out_ids[i], skip_special_tokens=True)
                        stop_at = _find_stop(full, cfg.stop)
                        if stop_at is not None:
                            full, done[i], finish[i] = full[:stop_at], True, "stop"
                        if full.endswith("\ufffd") and not done[i]:
                            continue  # an incomplete multi-byte character: wait for the next token
                        delta, texts[i] = full[len(texts[i]) :], full
                        if stream and delta:
                            yield i, TokenEvent(text=delta, token_id=token)
                    if done[i]:
                        yield i, self._finish(i, prompts, out_ids, logps, texts, finish, t0, prefill_s, first_token_s, stream)
                if all(done):
                    break
                step_ids = next_ids[:, None]
                step_mask = torch.cat([step_mask, torch.ones((n, 1), dtype=step_mask.dtype, device=device)], dim=1)
                step_pos = step_pos[:, -1:] + 1
        for i in range(n):
            if not done[i]:
                full = tok.decode(out_ids[i], skip_special_tokens=True)
                stop_at = _find_stop(full, cfg.stop)
                if stop_at is not None:
                    full, finish[i] = full[:stop_at], "stop"
                delta, texts[i] = full[len(texts[i]) :], full
                if stream and delta:  # text held back for an incomplete character
                    yield i, TokenEvent(text=delta, token_id=None)
                yield i, self._finish(i, prompts, out_ids, logps, texts, finish, t0, prefill_s, first_token_s, stream)

    @staticmethod
    def _finish(
        i: int,
        prompts: list[list[int]],
        out_ids: list[list[int]],
        logps: list[list[float]],
        texts: list[str],
        finish: list[str],
        t0: float,
        prefill_s: float,
        first_token_s: float,
        stream: bool,
    ) -> Any:
        total = time.perf_counter() - t0
        generation = Generation(
            text=texts[i],
            token_ids=tuple(out_ids[i]),
            prompt_tokens=len(prompts[i]),
            completion_tokens=len(out_ids[i]),
            finish_reason=finish[i],
            mean_logprob=sum(logps[i]) / len(logps[i]) if logps[i] else 0.0,
            timings={"prefill_s": prefill_s, "first_token_s": first_token_s, "decode_s": total - prefill_s, "total_s": total},
        )
        return TokenEvent(text="", token_id=None, generation=generation) if stream else generation


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < cfg.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _generation_config(settings: Mapping[str, Any]) -> GenerationConfig:
    settings = dict(settings)
    stop = settings.pop("stop", None) or ()
    if isinstance(stop, str):
        stop = (stop,)
    unknown = set(settings) - {"max_new_tokens", "temperature", "top_p", "seed"}
    if unknown:
        msg = f"Unknown generation settings {sorted(unknown)}. Use max_new_tokens, temperature, top_p, stop, seed."
        raise ConfigError(msg)
    return GenerationConfig(stop=tuple(stop), **{k: v for k, v in settings.items() if v is not None})


def validate_document(text: object) -> str:
    """Return ``text`` if it is internalizable text; raise ``InvalidDocumentError`` saying why not."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            msg = "The document is binary data, not UTF-8 text. Extract its text first (e.g. KnowledgeBase.add(path) parses files)."
            raise InvalidDocumentError(msg) from None
    if not isinstance(text, str):
        msg = f"A document must be a str, got {type(text).__name__}."
        raise InvalidDocumentError(msg)
    if not text.strip():
        msg = "The document is empty or whitespace only; there is nothing to internalize."
        raise InvalidDocumentError(msg)
    bad = sum(1 for ch in text[:10_000] if ord(ch) < 32 and ch not in "\n\r\t\f\v")
    if bad > max(8, len(text[:10_000]) // 100):
        msg = f"The document contains {bad} control characters in its first 10k characters: it looks like binary data. Pass extracted text."
        raise InvalidDocumentError(msg)
    return text


def validate_messages(messages: Sequence[Message]) -> None:
    if not messages:
        msg = "The message list is empty. Pass at least one user message."
        raise InvalidMessagesError(msg)
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            msg = f"Each message must be a mapping with str 'role' and 'content'; got {m!r:.120}."
            raise InvalidMessagesError(msg)
        if m["role"] not in ("system", "user", "assistant"):
            msg = f"Unsupported message role {m['role']!r}. Use 'system', 'user' or 'assistant'."
            raise InvalidMessagesError(msg)
    if all(m["role"] == "system" for m in messages):
        msg = "The conversation has only system messages. Add a user message to answer."
        raise InvalidMessagesError(msg)


SHIPPED_CHECKPOINTS: Final = Path(__file__).resolve().parent.parent / "checkpoints"


def shipped_checkpoint_path(base_model: str) -> Path | None:
    """The checkpoint folder shipped in the package for ``base_model``, or None.

    Shipped checkpoints live in ``d2l_integrations/checkpoints/<name>/config.json`` whose
    ``base_model`` field names the base model they were trained for.
    """
    import json

    if not SHIPPED_CHECKPOINTS.is_dir():
        return None
    for config in sorted(SHIPPED_CHECKPOINTS.glob("*/config.json")):
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring unreadable shipped checkpoint config %s", config)
            continue
        hyper = data.get("hypernetwork", data)
        if hyper.get("base_model") == base_model and data.get("shipped", True):
            return config.parent
    return None


def _load_hypernetwork(path: Path, base: BaseModel) -> Any:
    from d2l_integrations.engine import checkpoint as ckpt

    return ckpt.load_internalizer(path, base)
