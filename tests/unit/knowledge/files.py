"""Real documents of every supported format, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

FACT = "The Zorblax Institute was founded in 1873 by Mira Quell in the city of Tarnow."
SECOND = "The river Seine flows through Paris, the capital of France."


def write_txt(path: Path) -> Path:
    path.write_text(f"Zorblax history\n\n{FACT}\n\nIt studies rare lichens.\n\n{SECOND}\n", encoding="utf-8")
    return path


def write_md(path: Path) -> Path:
    path.write_text(
        f"# Zorblax Institute\n\n{FACT}\n\n## Rivers\n\n{SECOND}\n\n- first item about lichens\n- second item\n",
        encoding="utf-8",
    )
    return path


def write_html(path: Path) -> Path:
    path.write_text(
        "<html><head><title>t</title><script>var hidden = 'never indexed';</script></head><body>"
        f"<h1>Zorblax Institute</h1><p>{FACT}</p><h2>Rivers</h2><p>{SECOND}</p>"
        "<ul><li>first item about lichens</li><li>second item</li></ul></body></html>",
        encoding="utf-8",
    )
    return path


def write_pdf(path: Path) -> Path:
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path))
    c.drawString(72, 720, "Zorblax Institute")
    c.drawString(72, 700, FACT)
    c.showPage()
    c.drawString(72, 720, SECOND)
    c.showPage()
    c.save()
    return path


def write_scanned_pdf(path: Path) -> Path:
    """A PDF with drawings but no text layer (what a scan looks like to a text extractor)."""
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path))
    c.rect(100, 100, 300, 400, fill=1)
    c.showPage()
    c.save()
    return path


def write_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Zorblax Institute", level=1)
    document.add_paragraph(FACT)
    document.add_heading("Rivers", level=2)
    document.add_paragraph(SECOND)
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "lichen"
    table.cell(0, 1).text = "count"
    table.cell(1, 0).text = "Xanthoria"
    table.cell(1, 1).text = "42"
    document.save(str(path))
    return path


WRITERS = {".txt": write_txt, ".md": write_md, ".html": write_html, ".pdf": write_pdf, ".docx": write_docx}
