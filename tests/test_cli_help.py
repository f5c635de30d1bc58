"""The CLI speaks well: help that lists what exists, states each default once and ends with an example that
parses; `--version`; no abbreviated options; and one line per failure, with the exit status saying whose it
is (2: a usage error or the user's mistake, 1: a runtime failure), the traceback only with --debug /
SANA_DEBUG=1."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import sana
from sana.cli.main import COMMANDS, HelpFormatter, build_parser, main, subparsers
from sana.errors import RuntimeFailure, UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("SANA_DEBUG", raising=False)


def run(*args: object) -> int:
    return main([str(a) for a in args])


def all_commands() -> list[tuple[str, ...]]:
    """Every command path: ("generate",), ..., ("data",), ("data", "shapes"), ..."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.append((*path, name))
                    walk(child, (*path, name))

    walk(build_parser(), ())
    return found


def parser_of(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = next(p for p in subparsers(parser) if p.prog.split()[-1] == name)
    return parser


def one_line_error(err: str, command: str) -> str:
    """The message of a stderr that holds exactly one `sana COMMAND: error: ...` line and no traceback."""
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    prefix = f"sana {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) : -1]


def usage_error(capsys, prog: str, *argv: object) -> str:
    """Run a command that argparse must refuse: status 2, the usage, then one error line (returned)."""
    with pytest.raises(SystemExit) as info:
        run(*argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"usage: {prog}"), captured.err
    assert [line for line in lines if "error:" in line] == [lines[-1]], captured.err
    assert lines[-1].startswith(f"{prog}: error: "), captured.err
    return lines[-1]


COMMAND_PATHS = all_commands()


def test_the_walk_finds_every_command_and_sub_command():
    assert {p[0] for p in COMMAND_PATHS} == set(COMMANDS)
    assert {("data", "shapes"), ("eval", "shapes"), ("captions", "score")} <= set(COMMAND_PATHS)


# ---------------------------------------------------------------------------------------------------- help


def test_top_level_help_lists_the_commands_that_exist(capsys):
    with pytest.raises(SystemExit) as info:
        run("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert ", ".join(COMMANDS) in " ".join(out.split())  # the description, whatever its line breaks
    assert "run, convert, train, serve" not in out
    listed = re.findall(r"^    (\S+) +\S", out, re.MULTILINE)  # "    generate  generate images ..."
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("path", [(), *COMMAND_PATHS], ids=lambda p: " ".join(p) or "sana")
def test_help_states_each_default_once_and_ends_with_an_example_that_parses(capsys, path):
    with pytest.raises(SystemExit) as info:
        run(*path, "--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "default: False" not in out and "(default: )" not in out

    formatter = HelpFormatter("sana")
    for action in parser_of(path)._actions:
        text = formatter._expand_help(action) if action.help else ""  # the help as printed
        assert text.lower().count("default") <= 1, (action.dest, text)

    lines = out.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line == "example:")
    examples = [line.strip() for line in lines[start + 1 :]]
    assert examples and all(line.startswith("sana ") for line in examples), examples
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "sana"
        build_parser().parse_args(words[1:])  # the example names no flag that does not exist
        if path:
            assert words[1 : 1 + len(path)] == list(path), example  # and is an example of this command


def test_a_default_inside_the_help_s_closing_parenthesis(capsys):
    with pytest.raises(SystemExit):
        run("serve", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "TCP port (0: any free port, printed at start; default: 8000)" in out
    assert "(default: the model shipped with the package)" in out  # stated by the help: not again


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        run("--version")
    assert info.value.code == 0
    assert capsys.readouterr().out == f"sana {sana.__version__}\n"
    assert sana.__version__ == "0.1.0"


# ------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "argv, prog, flag",
    [
        (["generate", "x", "--images", "2"], "sana generate", "--images"),  # not --images-per-prompt
        (["generate", "x", "--neg", "dark"], "sana generate", "--neg"),
        (["serve", "--max-b", "2"], "sana serve", "--max-b"),
        (["data", "shapes", "--n", "1", "--out", "x", "--over"], "sana data shapes", "--over"),
        (["eval", "shapes", "--n-per", "1"], "sana eval shapes", "--n-per"),
        (["captions", "score", "m.jsonl", "--out", "o.jsonl", "--batch", "4"], "sana captions score", "--batch"),
        (["train", "run.yaml", "--res"], "sana train", "--res"),
    ],
)
def test_abbreviated_options_are_refused(capsys, argv, prog, flag):
    line = usage_error(capsys, prog, *argv)
    assert "unrecognized arguments" in line and flag in line.split()


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["generate", "a cat", "--steps", "many"], "sana generate"),
        (["convert", "only.pth"], "sana convert"),
        (["demo", "--seed", "x"], "sana demo"),
        (["cache", "--resolution", "high"], "sana cache"),
        (["captions"], "sana captions"),
        (["captions", "score", "m.jsonl"], "sana captions score"),
        (["train"], "sana train"),
        (["data", "shapes", "--out", "x"], "sana data shapes"),
        (["serve", "--port", "http"], "sana serve"),
        (["eval", "shapes", "--dtype", "fp64"], "sana eval shapes"),
        (["nope"], "sana"),
    ],
)
def test_usage_errors_exit_2_with_one_error_line(capsys, argv, prog):
    usage_error(capsys, prog, *argv)


# ---------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-o", "{tmp}/x.png"], "no prompt given"),
        (["convert", "{tmp}/orig.pth", "{tmp}/file"], "is a file, not a folder"),
        (["demo", "--out", "{tmp}/file"], "is a file, not a folder"),
        (["cache", "{tmp}"], "need DATA, --model and --out"),
        (["captions", "score", "{tmp}/m.jsonl", "--out", "{tmp}/o.jsonl"], "--pretrained is required"),
        (["train", "{tmp}/missing.yaml"], "no such run config"),
        (["data", "shapes", "--n", "1", "--out", "{tmp}/d", "--size", "32"], "--size must be at least 64"),
        (["serve", "--max-side", "33"], "--max-side must be a multiple of 32"),
        (["eval", "shapes", "--save-images"], "--save-images needs --out"),
    ],
)
def test_each_command_reports_a_user_error_in_one_line_with_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("a file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run(*argv) == 2
    assert message in one_line_error(capsys.readouterr().err, argv[0])


# ------------------------------------------------------------------------------------------ runtime failures


def _out_of_memory(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 1 GiB free.")


def test_out_of_memory_is_a_one_line_runtime_failure(tmp_path, capsys, monkeypatch):
    from sana.pipeline import SanaPipeline

    monkeypatch.setattr(SanaPipeline, "from_pretrained", _out_of_memory)
    assert run("generate", "a cat", "--device", "cuda", "-o", tmp_path / "x.png", "--quiet") == 1
    message = one_line_error(capsys.readouterr().err, "generate")
    assert message == (
        "out of memory on cuda: try --offload model (or sequential), --quantize int8, --low-memory, a smaller "
        "--batch-size, or a smaller --height / --width (see docs/low-memory.md)"
    )
    assert run("eval", "shapes", "--device", "cuda:1") == 1
    assert one_line_error(capsys.readouterr().err, "eval").startswith("out of memory on cuda:1: try a smaller")


def test_out_of_memory_at_serve_start_is_one_line(capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    from sana.pipeline import SanaPipeline

    monkeypatch.setattr(SanaPipeline, "from_pretrained", _out_of_memory)
    assert run("serve", "--device", "cuda") == 1
    assert one_line_error(capsys.readouterr().err, "serve").startswith(
        "out of memory on cuda: try --offload model"
    )


def test_out_of_memory_shows_its_traceback_with_sana_debug(tmp_path, monkeypatch):
    import torch

    from sana.pipeline import SanaPipeline

    monkeypatch.setattr(SanaPipeline, "from_pretrained", _out_of_memory)
    monkeypatch.setenv("SANA_DEBUG", "1")
    with pytest.raises(torch.OutOfMemoryError):
        run("generate", "a cat", "--device", "cuda", "-o", tmp_path / "x.png")


def test_a_diverged_training_run_is_a_runtime_failure(tmp_path, capsys, monkeypatch):
    import sana.training
    import sana.training.tasks
    from sana.training import TrainingError

    assert issubclass(TrainingError, RuntimeFailure) and not issubclass(TrainingError, UserError)

    def diverge(cfg):
        raise TrainingError("step 5: non-finite loss (nan); stopping, the last good checkpoint is runs/x/step-4")

    monkeypatch.setattr(sana.training.tasks, "load_train_config", lambda path, overrides: object())
    monkeypatch.setattr(sana.training, "train", diverge)
    assert run("train", tmp_path / "run.yaml") == 1
    assert one_line_error(capsys.readouterr().err, "train").startswith("step 5: non-finite loss")
    with pytest.raises(TrainingError):
        run("--debug", "train", tmp_path / "run.yaml")


def test_an_unreachable_hub_is_a_runtime_failure_and_a_bad_id_the_user_s_mistake(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    from sana.pretrained import HubUnavailableError
    from sana.weights import CheckpointError

    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert run("generate", "a cat", "--model", "org/model", "-o", tmp_path / "x.png") == 1
    message = one_line_error(capsys.readouterr().err, "generate")
    assert (
        message
        == "org/model is not a local folder and could not be fetched from the Hub: We couldn't connect to 'https://huggingface.co'."
    )
    # Callers that catch CheckpointError around the loader still do.
    assert issubclass(HubUnavailableError, CheckpointError) and issubclass(HubUnavailableError, RuntimeFailure)

    def bad_id(repo_id, allow_patterns):
        raise HFValidationError("Repo id must use alphanumeric chars: 'org/mo del'.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", bad_id)
    assert run("generate", "a cat", "--model", "org/mo del", "-o", tmp_path / "x.png") == 2
    assert "Repo id must use alphanumeric chars" in one_line_error(capsys.readouterr().err, "generate")


def test_other_exceptions_still_propagate(tmp_path, monkeypatch):
    from sana.pipeline import SanaPipeline

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")  # a bug, not an OOM

    monkeypatch.setattr(SanaPipeline, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run("generate", "a cat", "-o", tmp_path / "x.png")


def test_in_a_real_process_a_runtime_failure_is_one_line_and_sana_debug_shows_its_traceback(tmp_path):
    # Two processes only: each costs an interpreter start and a torch import.
    code = (
        "import sys, torch\n"
        "from sana.pipeline import SanaPipeline\n"
        "def oom(*args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "SanaPipeline.from_pretrained = oom\n"
        "from sana.cli.main import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", code, "generate", "a cat", "--device", "cuda", "-o", str(tmp_path / "x.png")]
    env = {k: v for k, v in os.environ.items() if k != "SANA_DEBUG"}
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert one_line_error(result.stderr, "generate").startswith("out of memory on cuda: ")

    result = subprocess.run(
        argv, cwd=REPO, env=env | {"SANA_DEBUG": "1"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "OutOfMemoryError: CUDA out of memory" in result.stderr
