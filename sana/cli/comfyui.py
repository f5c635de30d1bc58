"""`sana comfyui install COMFYUI_DIR`: link the ComfyUI node pack (the repository's comfyui/ folder) into
COMFYUI_DIR/custom_nodes/ and say what else to do (install `sana` into ComfyUI's Python, restart it).

The pack is a folder of the source tree, not part of the installed package: this command finds it next to the
`sana` package of a clone (an editable install, or `pip install` of a clone), or takes it from --pack.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sana.errors import UserError

EXAMPLE = "example:\n  sana comfyui install ~/ComfyUI"
LINK_NAME = "comfyui-sana"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser(
        "install",
        help="link the node pack into COMFYUI_DIR/custom_nodes/ and print the remaining steps",
        description=__doc__,
        epilog=EXAMPLE,
        allow_abbrev=False,
    )
    s.add_argument("comfyui_dir", metavar="COMFYUI_DIR", help="the ComfyUI folder (the one with main.py)")
    s.add_argument("--pack", help="the node pack folder (default: comfyui/ beside this sana package's source)")
    s.add_argument("--name", default=LINK_NAME, help="the link's name in custom_nodes/")


def find_pack(pack: str | None) -> Path:
    """The pack folder: --pack, else the comfyui/ folder of the source tree this `sana` was installed from."""
    import sana

    folder = Path(pack).expanduser() if pack else Path(sana.__file__).resolve().parents[1] / "comfyui"
    if not (folder / "__init__.py").is_file() or not (folder / "nodes.py").is_file():
        if pack:
            raise UserError(f"{folder} is not the Sana node pack (no __init__.py and nodes.py)")
        raise UserError(
            f"no node pack at {folder}: this sana was not installed from a source tree; clone the repository, "
            "`pip install` it, and run this again (or pass --pack CLONE/comfyui)"
        )
    return folder.resolve()


def comfyui_python(root: Path) -> str | None:
    """The Python a ComfyUI folder usually runs with (its venv, or the portable build's), if there is one."""
    for candidate in (
        "venv/bin/python",
        ".venv/bin/python",
        "../python_embeded/python.exe",
        "venv/Scripts/python.exe",
    ):
        if (root / candidate).is_file():
            return str((root / candidate).resolve())
    return None


def run(args: argparse.Namespace) -> int:
    root = Path(args.comfyui_dir).expanduser()
    if not (root / "main.py").is_file():
        raise UserError(f"{root} is not a ComfyUI folder (no main.py)")
    if not args.name or "/" in args.name or args.name in (".", ".."):
        raise UserError(f"--name must be a plain folder name, got {args.name!r}")
    pack = find_pack(args.pack)
    custom = root / "custom_nodes"
    custom.mkdir(exist_ok=True)
    link = custom / args.name
    if link.is_symlink() and link.resolve() == pack:
        print(f"{link} already links to {pack}")
    elif link.exists() or link.is_symlink():
        raise UserError(f"{link} already exists and is not a link to {pack}: remove it first")
    else:
        try:
            link.symlink_to(pack, target_is_directory=True)
        except OSError as e:
            raise UserError(f"cannot link {link} -> {pack} ({e.strerror or e}): copy {pack} there instead") from e
        print(f"linked {link} -> {pack}")
    python = comfyui_python(root) or "PYTHON"
    source = shlex.quote(str(pack.parent))
    print(
        "\nremaining steps:\n"
        f"  1. install sana into the Python ComfyUI runs with ({python if python != 'PYTHON' else 'its own'}):\n"
        f"       {python} -m pip install -e {source}\n"
        "     (a CPU-only torch also needs a torchvision that imports beside it: see docs/comfyui.md)\n"
        "  2. restart ComfyUI; the nodes are under 'sana' (double-click the canvas and type Sana)\n"
        f"  3. example workflows: drag a {pack / 'workflows'}{os.sep}*.ui.json file onto ComfyUI's page\n"
        f"  4. model folders (diffusers layout) go in {root / 'models' / 'sana'}; an empty model_path uses the "
        "small model shipped with sana",
        file=sys.stdout,
    )
    return 0
