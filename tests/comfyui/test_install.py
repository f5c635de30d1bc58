"""`sana comfyui install COMFYUI_DIR`: links the pack into custom_nodes/ (once), says what else to do, and
refuses what it cannot do in one line."""

from __future__ import annotations

from pathlib import Path

from sana.cli.main import main

PACK = Path(__file__).resolve().parents[2] / "comfyui"


def comfyui_folder(root: Path) -> Path:
    root.mkdir()
    (root / "main.py").write_text("# ComfyUI's entry point\n")
    return root


def test_links_the_pack_and_prints_the_remaining_steps(tmp_path, capsys):
    root = comfyui_folder(tmp_path / "ComfyUI")
    assert main(["comfyui", "install", str(root)]) == 0
    link = root / "custom_nodes" / "comfyui-sana"
    assert link.is_symlink() and link.resolve() == PACK
    assert (link / "__init__.py").is_file()
    out = capsys.readouterr().out
    assert f"-m pip install -e {PACK.parent}" in out and "restart ComfyUI" in out
    assert main(["comfyui", "install", str(root)]) == 0  # again: nothing to do
    assert "already links" in capsys.readouterr().out


def test_names_the_comfyui_python_when_it_has_a_venv(tmp_path, capsys):
    root = comfyui_folder(tmp_path / "ComfyUI")
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    main(["comfyui", "install", str(root)])
    assert f"{python.resolve()} -m pip install -e" in capsys.readouterr().out


def test_refusals_are_one_line(tmp_path, capsys):
    assert main(["comfyui", "install", str(tmp_path / "nowhere")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"sana comfyui: error: {tmp_path / 'nowhere'} is not a ComfyUI folder (no main.py)"
    )
    root = comfyui_folder(tmp_path / "ComfyUI")
    (root / "custom_nodes" / "comfyui-sana").mkdir(parents=True)
    assert main(["comfyui", "install", str(root)]) == 2
    assert "already exists and is not a link" in capsys.readouterr().err
    assert main(["comfyui", "install", str(root), "--pack", str(tmp_path)]) == 2
    assert "is not the Sana node pack" in capsys.readouterr().err
