"""The examples in README.md and docs/*.md are run or checked, so the documentation cannot drift from the code.

A fenced ```sh / ```python block is marked by an HTML comment on the line before it:
  <!-- example: run -->     executed: sh blocks with `bash -e`, python blocks with this interpreter, each in a
                            fresh temporary folder with `sana` on PATH, against the shipped model (fast settings)
  <!-- example: check -->   needs a real checkpoint, a GPU, the network or a long time: python blocks must
                            compile, and every `sana ...` command line of an sh block must parse with the real
                            CLI parser (a flag that does not exist fails)
  <!-- example: config -->  a complete run YAML: `load_train_config` must accept it
Every sh or python block must carry a marker: an unmarked command is one nobody checks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*example:\s*(run|check|config)\s*-->")
FENCE = re.compile(r"^```(\w*)")
COMMAND_LANGUAGES = {"sh", "bash", "shell", "console", "python", "py"}


@dataclass
class Example:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    kind: str | None  # run | check | config | None (unmarked)
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_python(self) -> bool:
        return self.language in ("python", "py")


def examples(page: Path) -> list[Example]:
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, language = i, fence.group(1).lower()
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        marker = MARKER.search(lines[start - 1]) if start > 0 else None
        found.append(Example(page, start + 1, language, marker.group(1) if marker else None, "\n".join(body)))
        i += 1
    return found


ALL = [e for page in PAGES for e in examples(page)]


def command_lines(code: str) -> list[list[str]]:
    """Each `sana ...` invocation of an sh block as argv after "sana" (continuations joined, comments dropped,
    `python -m sana` and `torchrun ... -m sana` included)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words and words[0] == "sana":
                commands.append(words[1:])
            elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "sana":
                commands.append(words[words.index("-m") + 2 :])
    return commands


def test_every_command_block_is_marked():
    unmarked = [e.where for e in ALL if e.language in COMMAND_LANGUAGES and e.kind is None]
    assert not unmarked, f"sh/python blocks without an <!-- example: run|check --> marker: {unmarked}"


def test_the_pages_have_examples_of_each_kind():
    kinds = {e.kind for e in ALL}
    assert {"run", "check"} <= kinds, kinds


def test_the_command_finder_reads_continuations_and_launchers():
    code = 'A=1 sana generate "a cat" \\\n  --seed 3  # comment\ntorchrun --nproc-per-node 2 -m sana generate x'
    assert command_lines(code) == [["generate", "a cat", "--seed", "3"], ["generate", "x"]]


@pytest.mark.parametrize("example", [e for e in ALL if e.kind == "check"], ids=lambda e: e.where)
def test_checked_examples_parse(example):
    if example.is_python:
        compile(example.code, example.where, "exec")
        return
    from sana.cli.main import build_parser

    parser = build_parser()
    for argv in command_lines(example.code):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{example.where}: `sana {shlex.join(argv)}` does not parse (exit {e.code})")


@pytest.mark.parametrize("example", [e for e in ALL if e.kind == "config"], ids=lambda e: e.where)
def test_config_examples_load(example, tmp_path):
    from sana.training.tasks import load_train_config

    path = tmp_path / "run.yaml"
    path.write_text(example.code)
    load_train_config(path)


@pytest.mark.parametrize("example", [e for e in ALL if e.kind == "run"], ids=lambda e: e.where)
def test_runnable_examples_run(example, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", example.code] if example.is_python else ["bash", "-e", "-c", example.code]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{example.where} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
