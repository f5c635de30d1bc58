"""Condition images for ControlNets, made from ordinary pictures (`sana control edges|hed IN OUT`).

edges  Canny edges through OpenCV: the same function `sana cache --control edges` applies to training images
       (sana/data/control.py), so a map made here is what a ControlNet trained by `sana train` saw.
hed    soft edges of the HED network (sana/models/hed.py), what the published Sana ControlNet was trained on.
       The weights are the user's: a file (.pth read with weights_only=True, or .safetensors), a folder holding
       `ControlNetHED.pth`, or a Hub repository id holding that file (fetched once by huggingface_hub).

Both take an RGB uint8 (H, W, 3) array and return an RGB uint8 (H, W, 3) array of the same size, white edges on
black, the form `sana.data.control.PREPROCESSORS` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana.errors import RuntimeFailure, UserError
from sana.models.hed import HED
from sana.weights import CheckpointError

HED_HUB_ID = "lllyasviel/Annotators"  # the ControlNet annotators' repository, which publishes the HED weights
HED_FILE = "ControlNetHED.pth"
HED_RESOLUTION = 512  # the detector's working short side, as ControlNet's annotators run it
_HED_MULTIPLE = 16  # four 2x2 max-pools: a side divisible by 16 keeps the five side outputs aligned
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class HubUnavailable(RuntimeFailure, CheckpointError):
    """HED weights named by a Hub id that could not be fetched (no network, the Hub down)."""


def hed_weights_file(source: str | Path) -> Path:
    """The weights file `source` names: a file, a folder with HED_FILE, or a Hub id "org/name" (downloaded).
    A one-line CheckpointError for a path that is none of these; HubUnavailable when the Hub is unreachable."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / HED_FILE).is_file():
            return path / HED_FILE
        raise CheckpointError(f"HED weights: {path} has no {HED_FILE}")
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or path.suffix in _WEIGHT_SUFFIXES:
        raise CheckpointError(f"HED weights not found: {source} (a file, a folder with {HED_FILE}, or a Hub id)")
    import huggingface_hub  # only when a Hub id is actually used
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(huggingface_hub.hf_hub_download(text, HED_FILE))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = (
            f"HED weights: {text} is not a local path and {HED_FILE} could not be fetched from the Hub: {first}"
        )
        # No such repository or file, a malformed id: the user's mistake. Offline (LocalEntryNotFoundError is
        # an EntryNotFoundError too), a timeout, the Hub failing: the machine's, a runtime failure.
        mistake = RepositoryNotFoundError | EntryNotFoundError | HFValidationError
        if isinstance(e, mistake) and not isinstance(e, LocalEntryNotFoundError):
            raise CheckpointError(message) from e
        raise HubUnavailable(message) from e


def load_hed(source: str | Path = HED_HUB_ID, device: torch.device | str = "cpu") -> HED:
    """The HED network filled strictly from the weights `source` names (see `hed_weights_file`)."""
    path = hed_weights_file(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle refused by weights_only, a damaged file: say which, on one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read HED weights {path}: {reason}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    model = HED()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    missing, unexpected = (
        sorted(set(model.state_dict()) - set(state)),
        sorted(set(state) - set(model.state_dict())),
    )
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a HED checkpoint: missing {missing[:4] or 'nothing'}, "
            f"unexpected {unexpected[:4] or 'nothing'}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes
        raise CheckpointError(f"{path} does not fit the HED network: {str(e).splitlines()[-1].strip()}") from None
    return model.to(device).eval()


def _working_size(height: int, width: int, resolution: int | None) -> tuple[int, int]:
    """The size HED runs at: the short side scaled to `resolution` (None: as is), sides rounded to 16."""
    scale = 1.0 if resolution is None else resolution / min(height, width)
    return tuple(
        max(_HED_MULTIPLE, round(side * scale / _HED_MULTIPLE) * _HED_MULTIPLE) for side in (height, width)
    )


@torch.no_grad()
def hed_edges(image: np.ndarray, model: HED, resolution: int | None = HED_RESOLUTION) -> np.ndarray:
    """HED soft edges of an RGB uint8 (H, W, 3) image as an RGB uint8 (H, W, 3) image of the same size.

    The detector runs with the short side at `resolution` (None: the image's own size, rounded to 16); the
    edge probability is resized back bilinearly and written as 0..255 grey."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"hed_edges needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if resolution is not None and resolution < _HED_MULTIPLE:
        raise UserError(f"HED resolution must be at least {_HED_MULTIPLE}, got {resolution}")
    height, width = image.shape[:2]
    param = next(model.parameters())
    rgb = torch.from_numpy(np.array(image)).to(param.device, param.dtype).permute(2, 0, 1)[None]  # a copy
    size = _working_size(height, width, resolution)
    if size != (height, width):
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
    edge = model(rgb).float()  # (1, 1, h, w) in (0, 1)
    if size != (height, width):
        edge = F.interpolate(edge, size=(height, width), mode="bilinear", align_corners=False)
    grey = (edge[0, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)
