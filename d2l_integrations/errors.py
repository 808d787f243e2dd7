"""Typed errors of d2l_integrations.

Every error says what happened, what was received, and what to do. Callers catch precisely:
``except IncompatibleCheckpointError`` rather than ``except ValueError``; every class also derives
from the closest builtin so generic handlers keep working.
"""

from __future__ import annotations


class D2LError(Exception):
    """Base class of every error raised by d2l_integrations."""


class ConfigError(D2LError, ValueError):
    """A configuration value is invalid or two values do not fit together."""


class RepeatedDataError(ConfigError):
    """A training run would repeat, from step 1, the batches its starting checkpoint was trained on."""


class InvalidDocumentError(D2LError, ValueError):
    """A document cannot be internalized: empty, whitespace only, or not text."""


class InvalidMessagesError(D2LError, ValueError):
    """A chat conversation is empty, has no user turn, or has unsupported content."""


class ContextLengthError(D2LError, ValueError):
    """A prompt does not fit the model's context window."""


class UnknownTargetModuleError(D2LError, ValueError):
    """A LoRA target module name does not exist in the base model."""


class IncompatibleCheckpointError(D2LError, ValueError):
    """A hypernetwork checkpoint was made for another base model or architecture."""


class IncompatibleAdapterError(D2LError, ValueError):
    """An adapter does not fit the model or the other adapters it is used with."""


class CheckpointNotFoundError(D2LError, FileNotFoundError):
    """No hypernetwork checkpoint exists where one was asked for."""


class HypernetworkUnavailableError(D2LError, RuntimeError):
    """The hypernetwork internalizer was requested but no trained checkpoint is loaded."""


class UntrustedCheckpointError(D2LError, ValueError):
    """A pickle checkpoint holds objects the restricted loader does not allow."""


class ModelNotFoundError(D2LError, FileNotFoundError):
    """A base model (or the embedded default) cannot be found locally."""


class AdapterNotFoundError(D2LError, KeyError):
    """An adapter id is not in the adapter store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ExportError(D2LError, FileExistsError):
    """An export target exists and is not empty."""


class InternalizationError(D2LError, RuntimeError):
    """Internalization failed (e.g. a non-finite loss); nothing was written."""


class UnsupportedDocumentError(D2LError, ValueError):
    """A file type the knowledge store cannot read (the message lists the supported ones)."""


class CorruptDocumentError(D2LError, ValueError):
    """A file is damaged or is not what its extension says (truncated PDF, binary renamed .txt)."""


class EmptyDocumentError(InvalidDocumentError):
    """A file or text has no extractable content (empty file, whitespace only, no text layer)."""


class NoTextLayerError(EmptyDocumentError):
    """A PDF has no text layer (e.g. a scan); it needs OCR before it can be ingested."""


class DocumentNotFoundError(D2LError, KeyError):
    """A document id is not in the knowledge base."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class KnowledgeBaseMismatchError(D2LError, ValueError):
    """A knowledge base was built with another base model or internalizer than the one given."""


class StoreLockTimeoutError(D2LError, TimeoutError):
    """Another process held the knowledge base's write lock for longer than the timeout."""


class NoAdaptersError(D2LError, ValueError):
    """A route that applies adapters (``d2l``/``hybrid``) was forced, but there is no adapter to apply."""


class UnsupportedContentError(D2LError, ValueError):
    """A message carries content the text-only base model cannot read (images, audio, files)."""


__all__ = [
    "AdapterNotFoundError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ContextLengthError",
    "CorruptDocumentError",
    "D2LError",
    "DocumentNotFoundError",
    "EmptyDocumentError",
    "ExportError",
    "HypernetworkUnavailableError",
    "IncompatibleAdapterError",
    "IncompatibleCheckpointError",
    "InternalizationError",
    "InvalidDocumentError",
    "InvalidMessagesError",
    "KnowledgeBaseMismatchError",
    "ModelNotFoundError",
    "NoAdaptersError",
    "NoTextLayerError",
    "StoreLockTimeoutError",
    "UnknownTargetModuleError",
    "UnsupportedContentError",
    "UnsupportedDocumentError",
    "UntrustedCheckpointError",
]
