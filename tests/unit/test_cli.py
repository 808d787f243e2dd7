"""The ``d2l`` command line without a model: ``--help`` everywhere, and bad input that fails fast.

Every error path here exits before a base model would load (``_engine`` is replaced by a function
that fails the test if called), prints one line on stderr and no traceback, and exits with 2.
The end-to-end runs on the real default model are in ``tests/integration/test_cli.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from d2l_integrations import cli
from d2l_integrations.errors import ConfigError

COMMANDS = ("demo", "ingest", "ask", "list", "delete", "export", "bench", "train")
WIDE = {"COLUMNS": "300"}  # rich wraps at 80 columns when stdout is not a terminal


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()  # click >= 8.2: result.stdout and result.stderr are kept apart


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if an error path gets as far as loading the base model."""

    def _engine(base_model: str, checkpoint: Path | None) -> None:
        pytest.fail(f"the command loaded a base model ({base_model!r}) before checking its input")

    monkeypatch.setattr(cli, "_engine", _engine)


def _assert_one_line_error(result, *fragments: str, code: int = 2) -> None:  # noqa: ANN001
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------- --help
def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, [], env=WIDE)
    assert result.exit_code == 2  # click's no_args_is_help exits like a usage error
    for command in COMMANDS:
        assert command in result.output


def test_top_level_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "--debug" in result.stdout and "--device" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("demo", "--routes"),
        ("ingest", "--store"),
        ("ask", "--route"),
        ("list", "--store"),
        ("delete", "doc_id"),
        ("export", "--out"),
    ],
)
def test_command_help(runner: CliRunner, command: str, expected: str) -> None:
    result = runner.invoke(cli.app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Usage: d2l " + command in result.stdout
    assert expected in result.stdout


def test_train_help_lists_the_trainer_options(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["train", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "--out" in result.stdout and "--tasks" in result.stdout  # the trainer's own parser answers


def test_bench_help_lists_the_benchmark_options(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["bench", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "--suite" in result.stdout


def test_bench_outside_a_checkout_says_so(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "benchmarks", None)  # `from benchmarks import run` raises ImportError
    result = runner.invoke(cli.app, ["bench", "--suite", "quick"], env=WIDE)
    _assert_one_line_error(result, "source checkout")


# ---------------------------------------------------------------------------------------- bad input
def test_demo_unknown_route(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["demo", "--store", str(tmp_path / "kb"), "--routes", "d2l,bogus"])
    _assert_one_line_error(result, "unknown route(s) ['bogus']", "full_context")
    assert not (tmp_path / "kb").exists()


def test_ingest_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / ("a-long-folder-name-" * 4) / "notes[v2].md"  # longer than 80 columns, and rich-markup-like
    result = runner.invoke(cli.app, ["ingest", str(missing), "--store", str(tmp_path / "kb")])
    _assert_one_line_error(result, str(missing), "Nothing was added")
    assert not (tmp_path / "kb").exists()


def test_ingest_needs_a_store(runner: CliRunner, tmp_path: Path) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("Some text.")
    result = runner.invoke(cli.app, ["ingest", str(doc)])
    assert result.exit_code == 2  # click's usage error
    assert "--store" in result.stderr
    assert "Traceback" not in result.output


def test_ask_missing_store(runner: CliRunner, tmp_path: Path) -> None:
    store = tmp_path / "no-such-kb"
    result = runner.invoke(cli.app, ["ask", "Who founded Zorblax?", "--store", str(store)])
    _assert_one_line_error(result, f"no knowledge base at {store}", "d2l ingest")
    assert not store.exists()


def test_ask_unknown_route(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["ask", "Who?", "--store", str(tmp_path), "--route", "telepathy"])
    _assert_one_line_error(result, "ConfigError", "'telepathy'")


@pytest.mark.parametrize("args", [["list"], ["delete", "some-doc"]])
def test_read_commands_do_not_create_a_missing_store(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    store = tmp_path / "typo-kb"
    result = runner.invoke(cli.app, [*args, "--store", str(store)])
    _assert_one_line_error(result, f"no knowledge base at {store}")
    assert not store.exists()


def test_export_needs_doc_id_or_text(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["export"])
    _assert_one_line_error(result, "DOC_ID", "--text")


def test_export_rejects_both_doc_id_and_text(runner: CliRunner, tmp_path: Path) -> None:
    text = tmp_path / "doc.txt"
    text.write_text("Some text.")
    result = runner.invoke(cli.app, ["export", "doc", "--text", str(text), "--store", str(tmp_path)])
    _assert_one_line_error(result, "either")


def test_export_doc_id_needs_a_store(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["export", "some-doc"])
    _assert_one_line_error(result, "--store is required")


def test_export_doc_id_missing_store(runner: CliRunner, tmp_path: Path) -> None:
    store = tmp_path / "no-such-kb"
    result = runner.invoke(cli.app, ["export", "some-doc", "--store", str(store)])
    _assert_one_line_error(result, "no knowledge base")
    assert not store.exists()


def test_export_missing_text_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["export", "--text", str(tmp_path / "absent.txt")])
    _assert_one_line_error(result, "no such file", "absent.txt")


def test_option_validation_is_a_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["ask", "Who?", "--store", str(tmp_path), "--max-new-tokens", "0"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------- errors raised inside a command
def _raise(exc: BaseException):  # noqa: ANN202
    def _engine(base_model: str, checkpoint: Path | None) -> None:
        raise exc

    return _engine


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nThe Quillon Observatory was founded in 1931.\n")
    return path


def test_d2l_error_is_one_line_exit_2(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, doc: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "_engine", _raise(ConfigError("Unknown base model 'nope'. Pass 'default', a hub id, or a folder.")))
    result = runner.invoke(cli.app, ["ingest", str(doc), "--store", str(tmp_path / "kb")])
    _assert_one_line_error(result, "Error (ConfigError):", "Unknown base model 'nope'")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_d2l_error_text_is_printed_verbatim(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, doc: Path, tmp_path: Path) -> None:
    # brackets in a message (paths, lists) are text, not rich markup: no MarkupError, nothing swallowed
    monkeypatch.setattr(cli, "_engine", _raise(ConfigError("bad folder [/data/old] for [v2]")))
    result = runner.invoke(cli.app, ["ingest", str(doc), "--store", str(tmp_path / "kb")])
    _assert_one_line_error(result, "bad folder [/data/old] for [v2]")


def test_debug_reraises_d2l_error(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, doc: Path, tmp_path: Path) -> None:
    error = ConfigError("Unknown base model 'nope'.")
    monkeypatch.setattr(cli, "_engine", _raise(error))
    result = runner.invoke(cli.app, ["--debug", "ingest", str(doc), "--store", str(tmp_path / "kb")])
    assert result.exception is error
    assert result.exit_code == 1


def test_unexpected_error_exits_1_and_points_to_debug(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, doc: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "_engine", _raise(RuntimeError("CUDA out of memory")))
    result = runner.invoke(cli.app, ["ingest", str(doc), "--store", str(tmp_path / "kb")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "Unexpected error (RuntimeError): CUDA out of memory" in result.stderr
    assert "--debug" in result.stderr


def test_keyboard_interrupt_exits_130(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, doc: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "_engine", _raise(KeyboardInterrupt()))
    result = runner.invoke(cli.app, ["ingest", str(doc), "--store", str(tmp_path / "kb")])
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr and "Traceback" not in result.output


def test_d2l_error_from_the_store_layer(runner: CliRunner, tmp_path: Path) -> None:
    """`d2l delete` of an unknown id in an existing store: the store's own D2LError, one line, exit 2."""
    from d2l_integrations.knowledge import KnowledgeBase

    store = tmp_path / "kb"
    KnowledgeBase(store, None).close()  # an empty store
    result = runner.invoke(cli.app, ["delete", "no-such-doc", "--store", str(store)])
    _assert_one_line_error(result, "no-such-doc")
