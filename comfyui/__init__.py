"""Sana for ComfyUI: this project's pipeline as nodes (see nodes.py and docs/comfyui.md).

Install: `pip install` the `sana` package into ComfyUI's Python, then `sana comfyui install COMFYUI_DIR` links
this folder into ComfyUI's custom_nodes/.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
