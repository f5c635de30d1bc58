"""User errors and bugs: the CLI turns a `UserError` into one line and exit status 2, lets every other exception
through with its traceback, and shows user errors' tracebacks too with `--debug` or SANA_DEBUG=1."""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sana
from sana.cli.main import main
from sana.errors import MissingFileError, UserError, read_user_file, user_path

REPO = Path(__file__).resolve().parents[1]


def run(*args: object) -> int:
    return main([str(a) for a in args])


def one_line_error(err: str, command: str) -> str:
    """The message of a stderr that holds exactly one `sana COMMAND: error: ...` line and no traceback."""
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"sana {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("SANA_DEBUG", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sana.pretrained import save_components
    from sana.tiny import tiny_components

    root = tmp_path_factory.mktemp("model")
    save_components(tiny_components(seed=0), root)
    return root


# --------------------------------------------------------------------------------------------- user errors


def test_yaml_syntax_error_in_cache_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "cache.yaml"
    config.write_text("data:\n  path: [unclosed\nmodel: m\n")
    assert run("cache", "--config", config) == 2
    message = one_line_error(capsys.readouterr().err, "cache")
    assert str(config) in message and "not valid YAML" in message and "line " in message


def test_missing_cache_config_is_one_line(tmp_path, capsys):
    assert run("cache", "--config", tmp_path / "nope.yaml") == 2
    message = one_line_error(capsys.readouterr().err, "cache")
    assert "nope.yaml" in message and "not found" in message


def test_text_encoder_folder_missing_its_files_is_one_line(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    for f in (broken / "text_encoder").iterdir():
        f.unlink()
    assert run("generate", "a cat", "--model", broken, "--steps", 1, "-o", tmp_path / "x.png", "--quiet") == 2
    message = one_line_error(capsys.readouterr().err, "generate")
    assert str(broken / "text_encoder") in message and "text encoder" in message
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--prompts-file", "{tmp}/nope.txt"], "--prompts-file not found: {tmp}/nope.txt"),
        (["--prompts-file", "{tmp}"], "cannot read --prompts-file {tmp}: Is a directory"),
        (["--chi-file", "{tmp}/nope.txt"], "instruction file not found: {tmp}/nope.txt"),
    ],
)
def test_unreadable_user_files_are_one_line(tmp_path, capsys, flags, expected):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    # The model does not exist: the file must be the first thing that fails.
    assert run("generate", "a cat", *flags, "--model", tmp_path / "missing", "-o", tmp_path / "x.png") == 2
    assert one_line_error(capsys.readouterr().err, "generate") == expected.replace("{tmp}", str(tmp_path))


def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\xff\xfe\n")
    assert run("generate", "--prompts-file", prompts, "-o", tmp_path / "x.png") == 2
    assert "is not UTF-8 text" in one_line_error(capsys.readouterr().err, "generate")


def test_bad_kinds_for_data_shapes_is_one_line(tmp_path, capsys):
    assert run("data", "shapes", "--n", 1, "--out", tmp_path / "d", "--kinds", "blob=1") == 2
    assert "unknown scene kind name(s) blob" in one_line_error(capsys.readouterr().err, "data")
    assert not (tmp_path / "d").exists()


def test_a_multi_line_user_error_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    import sana.pretrained

    def refuse(no_chi, chi_file):
        raise UserError("first line\n  second line\n")

    monkeypatch.setattr(sana.pretrained, "choose_instruction", refuse)
    assert run("generate", "a cat", "-o", tmp_path / "x.png") == 2
    assert one_line_error(capsys.readouterr().err, "generate") == "first line second line"


# ---------------------------------------------------------------------------------------------------- bugs


def test_a_bug_propagates_with_its_traceback(tmp_path, monkeypatch):
    import sana.pretrained

    def boom(no_chi, chi_file):
        raise ValueError("boom")

    monkeypatch.setattr(sana.pretrained, "choose_instruction", boom)
    with pytest.raises(ValueError, match="boom") as info:
        run("generate", "a cat", "-o", tmp_path / "x.png")
    assert not isinstance(info.value, UserError)


def test_other_os_errors_are_not_user_errors(tmp_path):
    # An I/O failure is the machine's, not the user's: it keeps its type and its traceback.
    with pytest.raises(OSError) as info, user_path(tmp_path / "f", "file"):
        raise OSError(errno.EIO, "Input/output error")
    assert not isinstance(info.value, UserError)


def _sana(*args: str, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m sana ARGS` (or `python -c CODE ARGS`) in a fresh process."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "sana"]), *args]
    environ = {k: v for k, v in os.environ.items() if k != "SANA_DEBUG"} | env
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)


def test_in_a_real_process_a_bug_prints_a_traceback_and_a_user_error_one_line(tmp_path):
    # Two processes only: each costs an interpreter start. Both fail before any model is loaded.
    bug = (
        "import sys, sana.cli.generate as g\n"
        "def boom(*args, **kwargs):\n"
        "    raise ValueError('boom')\n"
        "g.output_paths = boom\n"
        "from sana.cli.main import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    result = _sana("generate", "a cat", code=bug)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr
    assert "error: boom" not in result.stderr

    result = _sana("generate", "--prompts-file", str(tmp_path / "nope.txt"))
    assert result.returncode == 2
    assert one_line_error(result.stderr, "generate") == f"--prompts-file not found: {tmp_path / 'nope.txt'}"


# ------------------------------------------------------------------------------------------------ --debug


def test_debug_flag_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="nope.txt"):
        run("--debug", "generate", "--prompts-file", tmp_path / "nope.txt")
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("value, raises", [("1", True), ("true", True), ("0", False), ("", False)])
def test_sana_debug_env_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch, value, raises):
    monkeypatch.setenv("SANA_DEBUG", value)
    if raises:
        with pytest.raises(UserError, match="nope.txt"):
            run("generate", "--prompts-file", tmp_path / "nope.txt")
    else:
        assert run("generate", "--prompts-file", tmp_path / "nope.txt") == 2
        one_line_error(capsys.readouterr().err, "generate")


def test_sana_debug_in_a_real_process_prints_the_traceback(tmp_path):
    result = _sana("generate", "--prompts-file", str(tmp_path / "nope.txt"), SANA_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "MissingFileError: --prompts-file not found" in result.stderr


def test_debug_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        run("--help")
    assert "--debug" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- helpers


def test_read_user_file_explains_each_failure_in_one_line(tmp_path):
    (tmp_path / "good.txt").write_bytes(b"line\r\nend")
    assert read_user_file(tmp_path / "good.txt", "notes") == "line\nend"
    assert read_user_file(tmp_path / "good.txt", "notes", newline="") == "line\r\nend"
    with pytest.raises(FileNotFoundError, match="notes not found") as info:
        read_user_file(tmp_path / "missing.txt", "notes")
    assert isinstance(info.value, UserError)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = [
        (tmp_path, "cannot read notes .*: Is a directory"),
        (tmp_path / "good.txt" / "below", "cannot read notes .*: Not a directory"),
        (tmp_path / "latin1.txt", "is not UTF-8 text"),
    ]
    for path, message in cases:
        with pytest.raises(UserError, match=message) as info:
            read_user_file(path, "notes")
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- classes


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def test_every_user_error_class_of_the_package_is_a_value_error():
    for module in pkgutil.walk_packages(sana.__path__, "sana."):
        if module.name != "sana.__main__":  # running it would run the CLI
            importlib.import_module(module.name)
    classes = {c for c in _all_subclasses(UserError) if c.__module__.startswith("sana.")}
    names = {c.__name__ for c in classes}
    assert {"ConfigError", "CheckpointError", "ResumeError", "MissingFileError"} <= names, names
    for cls in classes | {UserError}:
        assert issubclass(cls, ValueError), cls
        assert isinstance(cls("a message"), ValueError), cls
    assert issubclass(MissingFileError, FileNotFoundError)
