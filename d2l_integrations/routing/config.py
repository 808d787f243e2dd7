"""``RouterConfig``: the thresholds of the ``auto`` policy, written by ``benchmarks/calibrate_router.py``.

The thresholds are measured, not guessed: the calibration script runs the engine and the knowledge
base on dev data (questions never used for evaluation) and writes a sorted-key JSON file. Load it
with ``RouterConfig.load(path)``; ``RouterConfig.default()`` reads ``$D2L_ROUTER_CONFIG`` or the
calibration shipped beside this module, and falls back to the dataclass defaults with a warning
that they are uncalibrated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2l_integrations.errors import ConfigError

logger = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).parent / "calibration"
"""Calibrations shipped with the package, one ``<base model slug>.json`` per base model."""

DEFAULT_RAG_CUES: tuple[str, ...] = (
    r"\bquote\b",
    r"\bverbatim\b",
    r"\bword[- ]for[- ]word\b",
    r"\bexact(ly)? (words?|wording|phrase|text)\b",
    r"\bcite\b",
    r"\bwhich (section|page|paragraph)\b",
)
"""Query cues that ask for the source's exact text: a LoRA stores facts, not verbatim strings."""

DEFAULT_BROAD_CUES: tuple[str, ...] = (
    r"\b(list|name) (all|every)\b",
    r"\ball (of )?the\b",
    r"\bcompare\b",
    r"\bsummari[sz]e\b",
    r"\bhow many (times|documents|sections)\b",
)
"""Query cues that need many chunks at once (more than the adapter budget allows)."""


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Thresholds and sizes of the routing policies.

    Args:
        top_k: chunks retrieved per query (all policies that retrieve).
        min_relevance: retrieval score at or above which a chunk counts as relevant. Scores are the
            knowledge base's (higher = more similar).
        adapter_budget: the most chunk adapters summed for one answer; with more relevant chunks
            ``auto`` picks RAG (summed deltas degrade answers as their number grows).
        min_confidence: mean token log-probability of a D2L answer below which ``auto`` discards it
            and answers by RAG instead.
        confidence_check: run the confidence fallback in ``auto`` (it costs a second generation
            when it triggers; streaming never re-generates).
        full_context_max_tokens: ``auto`` puts every document in the prompt when all of them fit
            in this many tokens (0 disables).
        rag_cues: regexes (case-insensitive) that send a query to RAG.
        broad_cues: regexes (case-insensitive) that send a query to RAG because it needs many chunks.
        context_template: how retrieved text is put into the last user message; ``{context}`` and
            ``{question}`` are filled in.
        base_model: the base model the thresholds were measured on.
        calibrated_on: what data the thresholds came from (None: uncalibrated defaults).
        measurements: the calibration's measured quality numbers, for the record.
    """

    top_k: int = 4
    min_relevance: float = 0.35
    adapter_budget: int = 4
    min_confidence: float = -1.5
    confidence_check: bool = True
    full_context_max_tokens: int = 0
    rag_cues: tuple[str, ...] = DEFAULT_RAG_CUES
    broad_cues: tuple[str, ...] = DEFAULT_BROAD_CUES
    context_template: str = "Context:\n{context}\n\nAnswer using the context.\nQuestion: {question}"
    base_model: str | None = None
    calibrated_on: str | None = None
    measurements: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            msg = f"RouterConfig.top_k must be >= 1, got {self.top_k}."
            raise ConfigError(msg)
        if self.adapter_budget < 1:
            msg = f"RouterConfig.adapter_budget must be >= 1, got {self.adapter_budget}. Use route='rag' to never apply adapters."
            raise ConfigError(msg)
        if self.full_context_max_tokens < 0:
            msg = f"RouterConfig.full_context_max_tokens must be >= 0 (0 disables), got {self.full_context_max_tokens}."
            raise ConfigError(msg)
        for name in ("min_relevance", "min_confidence"):
            if not math.isfinite(getattr(self, name)):
                msg = f"RouterConfig.{name} must be finite, got {getattr(self, name)}."
                raise ConfigError(msg)
        if "{context}" not in self.context_template or "{question}" not in self.context_template:
            msg = f"RouterConfig.context_template must contain '{{context}}' and '{{question}}', got {self.context_template!r}."
            raise ConfigError(msg)

    @property
    def is_calibrated(self) -> bool:
        return self.calibrated_on is not None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rag_cues"] = list(self.rag_cues)
        d["broad_cues"] = list(self.broad_cues)
        d["measurements"] = dict(sorted(self.measurements.items()))
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("Ignoring unknown RouterConfig keys (written by a newer version?): %s", unknown)
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("rag_cues", "broad_cues"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "measurements" in kwargs:
            kwargs["measurements"] = {str(k): float(v) for k, v in dict(kwargs["measurements"]).items()}
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write sorted-key JSON to ``path`` (parents created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RouterConfig:
        """Read a JSON file written by ``save`` (or ``benchmarks/calibrate_router.py``)."""
        path = Path(path)
        if not path.is_file():
            msg = f"No router calibration at {str(path)!r}. Run `python benchmarks/calibrate_router.py --out {path}` or pass RouterConfig(...)."
            raise ConfigError(msg)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            msg = f"Router calibration {str(path)!r} is not valid JSON ({exc}). Re-run benchmarks/calibrate_router.py."
            raise ConfigError(msg) from exc
        return cls.from_dict(data)

    @classmethod
    def default(cls, base_model: str | None = None) -> RouterConfig:
        """The calibration for ``base_model``: ``$D2L_ROUTER_CONFIG``, else the shipped one, else defaults.

        Uncalibrated defaults are logged as a warning, since their thresholds were not measured.
        """
        env = os.environ.get("D2L_ROUTER_CONFIG")
        if env:
            return cls.load(env)
        if base_model is not None:
            shipped = CALIBRATION_DIR / f"{calibration_slug(base_model)}.json"
            if shipped.is_file():
                return cls.load(shipped)
        logger.warning(
            "No router calibration for base model %r: using uncalibrated default thresholds. "
            "Run benchmarks/calibrate_router.py and set D2L_ROUTER_CONFIG to its output.",
            base_model,
        )
        return cls(base_model=base_model)


def calibration_slug(base_model: str) -> str:
    """File-name-safe form of a base model name: ``HuggingFaceTB/SmolLM2-135M-Instruct`` -> ``huggingfacetb--smollm2-135m-instruct``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base_model.replace("/", "--")).lower()


__all__ = ["CALIBRATION_DIR", "DEFAULT_BROAD_CUES", "DEFAULT_RAG_CUES", "RouterConfig", "calibration_slug"]
