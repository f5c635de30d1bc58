"""Condition images: `sana control edges` (OpenCV Canny) and `sana control hed` (the HED network, weights by path
or Hub id), the HED checkpoint layout, and one-line errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sana.cli.main import main
from sana.models.hed import HED
from sana.preprocess import HED_FILE, HubUnavailable, hed_edges, load_hed
from sana.weights import CheckpointError

cv2 = pytest.importorskip("cv2")

# The published ControlNetHED.pth layout: a per-channel input offset, then five VGG stages of 2, 2, 3, 3, 3 3x3
# convolutions (64, 128, 256, 512, 512 channels), each with a 1x1 side-output projection to one channel.
_STAGES = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
PUBLISHED_SHAPES = {"norm": (1, 3, 1, 1)}
for _i, (_a, _b, _n) in enumerate(_STAGES, start=1):
    for _j in range(_n):
        PUBLISHED_SHAPES[f"block{_i}.convs.{_j}.weight"] = (_b, _a if _j == 0 else _b, 3, 3)
        PUBLISHED_SHAPES[f"block{_i}.convs.{_j}.bias"] = (_b,)
    PUBLISHED_SHAPES[f"block{_i}.projection.weight"] = (1, _b, 1, 1)
    PUBLISHED_SHAPES[f"block{_i}.projection.bias"] = (1,)


def run(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(err: str, command: str = "control") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"sana {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix(f"sana {command}: error: ")


def picture(height: int = 48, width: int = 64) -> np.ndarray:
    """Coloured rectangles on grey: clear edges, two of them between colours of similar brightness."""
    image = np.full((height, width, 3), 128, np.uint8)
    image[8:30, 6:30] = (230, 40, 40)
    image[20:44, 34:60] = (40, 200, 60)
    image[2:12, 40:62] = (255, 255, 0)
    return image


def random_hed(seed: int = 0) -> HED:
    torch.manual_seed(seed)
    model = HED()
    with torch.no_grad():  # PyTorch's default initialisation, and a mean colour to subtract
        model.norm.copy_(torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1))
    return model.eval()


# ------------------------------------------------------------------------------------------------- edges


def test_edges_command_writes_opencv_canny_edges(tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "edges.png"
    Image.fromarray(picture()).save(source)
    assert run("control", "edges", source, out, "--width", 1) == 0
    written = np.asarray(Image.open(out))
    expected = cv2.Canny(picture(), 100, 200)  # the oracle: OpenCV itself, on the colour image
    assert written.shape == (48, 64, 3)
    assert np.array_equal(written[..., 0], expected) and np.array_equal(written[..., 2], expected)
    assert expected.any() and not expected.all()
    # The default width widens the lines, as `sana cache --control edges` does for training.
    assert run("control", "edges", source, out) == 0
    wide = np.asarray(Image.open(out))[..., 0]
    assert np.array_equal(wide, cv2.dilate(expected, np.ones((3, 3), np.uint8)))


def test_cli_defaults_are_the_library_s():
    import sana.cli.control as cli
    from sana.data.control import EDGE_THRESHOLDS, EDGE_WIDTH
    from sana.preprocess import HED_HUB_ID, HED_RESOLUTION

    assert (cli.EDGE_THRESHOLDS, cli.EDGE_WIDTH) == (EDGE_THRESHOLDS, EDGE_WIDTH)
    assert (cli.HED_HUB_ID, cli.HED_RESOLUTION) == (HED_HUB_ID, HED_RESOLUTION)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("edges", "{text}", "{out}"), "is not an image file"),
        (("edges", "{missing}", "{out}"), "input image not found"),
        (("edges", "{picture}", "{tmp}/x.unknown"), "unknown image format"),
        (("edges", "{picture}", "{out}", "--low", "300"), "need 0 <= --low <= --high"),
        (("hed", "{picture}", "{out}", "--weights", "{missing}"), "HED weights not found"),
        (("hed", "{picture}", "{out}", "--weights", "{tmp}"), f"has no {HED_FILE}"),
        (("hed", "{picture}", "{out}", "--weights", "{text}"), "cannot read HED weights"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    Image.fromarray(picture()).save(tmp_path / "p.png")
    (tmp_path / "notes.txt").write_text("not an image")
    names = dict(text=tmp_path / "notes.txt", missing=tmp_path / "none.pth", picture=tmp_path / "p.png",
                 out=tmp_path / "out.png", tmp=tmp_path)  # fmt: skip
    assert run("control", *[a.format(**names) for a in args]) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out.png").exists()


# --------------------------------------------------------------------------------------------------- HED


def test_hed_state_dict_is_the_published_layout():
    assert {k: tuple(v.shape) for k, v in HED().state_dict().items()} == PUBLISHED_SHAPES


def test_hed_is_the_sigmoid_of_the_mean_upsampled_side_output():
    """Property: at the image's own size the map is sigmoid(mean of the five side outputs, each upsampled
    bilinearly), computed here from the convolutions directly."""
    model = random_hed()
    image = picture(32, 48)
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None] - model.norm
    state = model.state_dict()
    sides = []
    for i, (_, _, n) in enumerate(_STAGES, start=1):
        if i > 1:
            x = F.max_pool2d(x, 2)
        for j in range(n):
            weight, bias = state[f"block{i}.convs.{j}.weight"], state[f"block{i}.convs.{j}.bias"]
            x = F.relu(F.conv2d(x, weight, bias, padding=1))
        side = F.conv2d(x, state[f"block{i}.projection.weight"], state[f"block{i}.projection.bias"])
        sides.append(F.interpolate(side, size=(32, 48), mode="bilinear", align_corners=False))
    expected = (torch.sigmoid(torch.stack(sides).mean(0))[0, 0] * 255).round().to(torch.uint8).numpy()
    out = hed_edges(image, model, resolution=None)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out.min() < out.max()  # not a constant map
    # At another working resolution the map still comes back at the picture's size.
    assert hed_edges(picture(40, 70), model, resolution=16).shape == (40, 70, 3)


@pytest.mark.parametrize("form", ["pth", "folder", "safetensors"])
def test_hed_weights_load_strictly_by_path(tmp_path, form):
    model = random_hed(seed=1)
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "hed.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = tmp_path / HED_FILE
        torch.save(model.state_dict(), path)
    loaded = load_hed(tmp_path if form == "folder" else path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_hed_weights_that_do_not_fit_or_are_unsafe_are_refused(tmp_path):
    state = random_hed().state_dict()
    state["block6.projection.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"not a HED checkpoint: missing nothing, unexpected \['block6"):
        load_hed(tmp_path / "extra.pth")
    state = random_hed().state_dict()
    state["block1.projection.bias"] = torch.zeros(2)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="does not fit the HED network"):
        load_hed(tmp_path / "shape.pth")
    torch.save({"net": argparse.Namespace(lr=1.0)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read HED weights"):
        load_hed(tmp_path / "evil.pth")


def test_hed_command_with_weights_by_path(tmp_path):
    torch.save(random_hed().state_dict(), tmp_path / HED_FILE)
    source, out = tmp_path / "in.png", tmp_path / "hed.png"
    Image.fromarray(picture(40, 56)).save(source)
    assert run("control", "hed", source, out, "--weights", tmp_path, "--resolution", 0) == 0
    expected = hed_edges(picture(40, 56), load_hed(tmp_path), resolution=None)
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_a_hub_id_offline_is_a_one_line_runtime_failure(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubUnavailable, match="lllyasviel/Annotators is not a local path"):
        load_hed("lllyasviel/Annotators")
    Image.fromarray(picture()).save(tmp_path / "p.png")
    assert run("control", "hed", tmp_path / "p.png", tmp_path / "out.png", "--weights", "org/hed") == 1
    assert "org/hed is not a local path" in one_line_error(capsys.readouterr().err)
