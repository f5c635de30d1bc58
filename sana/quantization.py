"""Quantized weights through torchao: the DiT in W8A8 (the paper's on-device scheme) or weight-only int8 / int4,
the Gemma text encoder in weight-only int8 / int4, and model folders that hold them.

Modes (torchao configs; no hand-written int8 kernels):
  DiT            w8a8   Int8DynamicActivationInt8WeightConfig: per-token symmetric int8 activations, per-channel
                        symmetric int8 weights (Sana section 4)
                 int8   Int8WeightOnlyConfig: per-channel int8 weights, activations in the compute dtype
                 int4   Int4WeightOnlyConfig, tinygemm's tile-packed layout: CUDA and bfloat16 only
  text encoder   int8, int4 as above, on every nn.Linear of the decoder

Which DiT layers are quantized. Sana's W8A8 keeps in high precision the normalisations, the linear attention
and the key/value projections of the cross-attention. Here, in `w8a8`:
  * quantized: every layer that runs once per image token, where the time and the weights are: the
    self-attention's q/k/v/out projections, the cross-attention's query and output projections, and the
    Mix-FFN's two 1x1 convolutions (replaced by the equivalent nn.Linear, which is what torchao quantizes).
  * kept: the cross-attention's key/value projections (the paper's exception: their input is the text
    encoder's states, whose few very large channels per-token int8 would crush; and they run over at most 300
    caption tokens, so they cost nothing); the caption projection before them (same input, same reason); the
    timestep embedding (a handful of rows per step, and its output scales every block's modulation, so its
    error would be amplified everywhere); the output projection (32 channels: the velocity itself); the patch
    embedding and the 3x3 depthwise convolution (convolutions, not matmuls); every norm and modulation table.
    The linear attention itself (ReLU(K)^T V and the normaliser) is not a layer: it runs in float32 as always.
In the weight-only modes the activations stay in the compute dtype, so the reasons about the text states do
not apply: every nn.Linear except the output projection is quantized (also the cross-attention's key/value
projections, the caption projection and the timestep MLP). int4 groups of 128 (else 64, 32) weights along the
input features; a layer whose width none of them divides stays in high precision. Gemma's embedding table
stays in the compute dtype in every mode: torchao's int8 embedding dequantizes the whole table on each lookup.

Quantized folders (`sana quantize`): the source folder with `transformer/` and/or `text_encoder/` holding
`quantized.safetensors` instead of their weight files, and `quantization.json` at the root naming the modes.
The file is safetensors (tensors) plus a JSON header describing each quantized tensor, torchao's format; before
torchao reads it, every entry is checked against an explicit allow-list of tensor types and dtypes, so loading
never runs a pickle. Loading such a folder does not quantize again.

Quantizing at load (`from_pretrained(quantize=...)`) streams: the weights are read block by block and each
block is quantized as soon as it is complete, so the full-precision model never sits in memory whole (a 4.8B
DiT in float32 would take 19 GB).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sana.errors import UserError
from sana.weights import (
    CONFIG_NAME,
    CheckpointError,
    _weight_files,
    atomic_write,
    check_keys,
    parse_dtype,
    read_header,
    write_json,
)

DIT_MODES = ("w8a8", "int8", "int4")
TEXT_ENCODER_MODES = ("int8", "int4")
QUANTIZATION_FILE = "quantization.json"
QUANTIZED_WEIGHTS = "quantized.safetensors"
FORMAT = 1
INT4_GROUPS = (128, 64, 32)
_PREFIX = "model."  # of every tensor name in a quantized file (see save_quantized_weights)

# What a quantized file may describe: torchao's tensor types used by the modes above, and plain tensors.
_ALLOWED_TENSOR_TYPES = {"Int8Tensor", "Int4TilePackedTo4dTensor", "Tensor"}
_ALLOWED_DTYPES = {"float32", "bfloat16", "float16"}
# ... and the small values those tensors carry (activation-quantization settings, granularity, mapping).
_ALLOWED_ATTRIBUTE_TYPES = {"torch.dtype", "QuantizeTensorToInt8Kwargs", "PerRow", "PerTensor", "MappingType"}
_COMPONENT_NAMES = {"transformer": "DiT", "text_encoder": "text encoder"}


# ------------------------------------------------------------------------------------------------- torchao


def torchao_quantization():
    """torchao.quantization, imported without its import-time log lines (it reports the CUDA extensions a CPU
    build cannot load, and torch logs a deprecation about one of its enums); a one-line UserError without it."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as e:
        raise UserError(f"quantization needs torchao (pip install torchao): {e}") from e
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quantization


def _problem(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `mode` cannot run on `device` in `dtype` with torchao, or None when it can."""
    if mode == "int4":
        if device.type != "cuda":
            return "torchao's int4 weight-only kernels (tinygemm, mslk) run on CUDA only"
        if dtype != torch.bfloat16:
            return "torchao's int4 kernel (tinygemm) computes in bfloat16: use dtype bf16"
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
            return "torchao's int4 kernel (tinygemm) needs a GPU of compute capability 8.0 or newer"
        return None
    if device.type not in ("cpu", "cuda"):
        return f"torchao's int8 kernels run on cpu and cuda, not {device.type}"
    return None


def check_mode(mode: str | None, component: str, device: torch.device | str, dtype: torch.dtype | str) -> None:
    """A one-line UserError, before any loading, when `mode` is unknown for `component` ("transformer" or
    "text_encoder") or cannot run on this device and dtype; it names the modes that can."""
    if mode is None:
        return
    device, dtype = torch.device(device), parse_dtype(dtype)
    modes = DIT_MODES if component == "transformer" else TEXT_ENCODER_MODES
    what = _COMPONENT_NAMES[component]
    if mode not in modes:
        raise UserError(f"unknown {what} quantization {mode!r}; choose one of {', '.join(modes)}")
    problem = _problem(mode, device, dtype)
    if problem is not None:
        can = [m for m in modes if _problem(m, device, dtype) is None]
        raise UserError(
            f"cannot quantize the {what} to {mode} on {device} in {str(dtype).removeprefix('torch.')}: "
            f"{problem}; modes that run here: {', '.join(can) or 'none'}"
        )
    torchao_quantization()


def _config(mode: str, device: torch.device, group: int | None = None):
    q = torchao_quantization()
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings.
    if mode == "w8a8":
        from torchao.utils import should_reduce_range

        # Without VNNI, x86 int8 products saturate; torchao halves the ranges there (its documented remedy).
        return q.Int8DynamicActivationInt8WeightConfig(
            set_inductor_config=False, reduce_range=should_reduce_range(device)
        )
    if mode == "int8":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    # tinygemm's layout: the int4 kernel that ships with torch (the default "plain" one needs the mslk package).
    return q.Int4WeightOnlyConfig(
        group_size=group, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D, set_inductor_config=False
    )


# -------------------------------------------------------------------------------------------- which layers


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The nn.Linear a 1x1 convolution is, sharing its weight (a view, no copy)."""
    out_features, in_features = conv.weight.shape[:2]
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def linearize_ffn(model: nn.Module) -> None:
    """Replace the DiT Mix-FFNs' 1x1 convolutions by equal nn.Linear layers (same state-dict names, 2-D
    weights), the layer type torchao quantizes; `sana.models.dit.pointwise` runs either."""
    from sana.models.dit import MixFFN

    for ffn in (m for m in model.modules() if isinstance(m, MixFFN)):
        for name in ("conv_inverted", "conv_point"):
            if isinstance(getattr(ffn, name), nn.Conv2d):
                setattr(ffn, name, _as_linear(getattr(ffn, name)))


_W8A8_BLOCK_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")
_W8A8_BLOCK_LAYERS += ("ff.conv_inverted", "ff.conv_point")


def dit_targets(model: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """The DiT's layers `mode` quantizes, by name (see the module docstring for the rule and its reasons).
    Call after `linearize_ffn`."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if mode == "w8a8":
        return {
            name: m
            for name, m in linears.items()
            if name.startswith("transformer_blocks.") and name.split(".", 2)[2] in _W8A8_BLOCK_LAYERS
        }
    return {name: m for name, m in linears.items() if name != "proj_out"}


def text_targets(model: nn.Module, mode: str) -> dict[str, nn.Linear]:
    """Every nn.Linear of the text encoder (the embedding table stays: see the module docstring)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def int4_group(layer: nn.Linear) -> int | None:
    return next((g for g in INT4_GROUPS if layer.in_features % g == 0), None)


def _quantize_layers(root: nn.Module, layers: list[nn.Linear], mode: str, device: torch.device) -> None:
    """Quantize `layers` (modules under `root`) in place with torchao. int4 packs on the device itself."""
    q = torchao_quantization()
    groups: dict[int | None, set[int]] = {}
    for layer in layers:
        group = int4_group(layer) if mode == "int4" else None
        if mode == "int4" and group is None:
            continue  # no group size divides the width: stays in high precision (see the module docstring)
        if mode == "int4":
            layer.to(device)
        groups.setdefault(group, set()).add(id(layer))
    for group, ids in groups.items():
        q.quantize_(root, _config(mode, device, group), filter_fn=lambda m, fqn, ids=ids: id(m) in ids)


def _mark(model: nn.Module, mode: str) -> None:
    model._sana_quantization = mode  # read by `quantization_of`; kept on the instance, nowhere global


def quantization_of(model: nn.Module | None) -> str | None:
    """The mode a model was quantized with, or None."""
    return getattr(model, "_sana_quantization", None)


def quantize_dit(model: nn.Module, mode: str, device: torch.device | str = "cpu") -> nn.Module:
    """Quantize a loaded SanaDiT in place (`device`: where int4 packs; int8 quantizes where the weights are)."""
    if quantization_of(model) is not None:
        raise UserError(f"this DiT is already quantized ({quantization_of(model)})")
    linearize_ffn(model)
    _quantize_layers(model, list(dit_targets(model, mode).values()), mode, torch.device(device))
    _mark(model, mode)
    return model.requires_grad_(False)


def quantize_text_model(model: nn.Module, mode: str, device: torch.device | str = "cpu") -> nn.Module:
    """Quantize a loaded text-encoder language model (Gemma-2) in place."""
    if quantization_of(model) is not None:
        raise UserError(f"this text encoder is already quantized ({quantization_of(model)})")
    _quantize_layers(model, list(text_targets(model, mode).values()), mode, torch.device(device))
    _mark(model, mode)
    return model.requires_grad_(False)


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for name in names for x in _inner_tensors(getattr(t, name))]
    return [t]


def weight_bytes(module: nn.Module) -> int:
    """The exact bytes of a module's parameters and buffers as stored (a quantized weight counts its integer
    data, scales and zero points), each shared tensor once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        for inner in _inner_tensors(t):
            seen.setdefault(id(inner), inner.numel() * inner.element_size())
    return sum(seen.values())


# ------------------------------------------------------------------------------------- streaming loading


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def stream_quantized(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    targets: dict[str, nn.Linear],
    mode: str,
    device: torch.device,
) -> nn.Module:
    """Fill the meta-device `model` from read(name) (each state-dict tensor in its final shape and dtype) one
    block at a time, quantizing each block's `targets` as soon as the block is complete; then the rest. So at
    most one block is in high precision besides the parts that stay so."""
    from sana.placement import block_units

    names = list(model.state_dict())
    prefix_of = {id(m): f"{n}." for n, m in model.named_modules()}
    filled: set[str] = set()
    quantized: set[str] = set()
    for unit in [*block_units(model), model]:  # the model itself last: what no block holds
        prefix = "" if unit is model else prefix_of[id(unit)]
        for name in names:
            if name.startswith(prefix) and name not in filled:
                _assign(model, name, read(name))
                filled.add(name)
        layers = [n for n in targets if f"{n}.".startswith(prefix) and n not in quantized]
        _quantize_layers(unit, [targets[n] for n in layers], mode, device)
        quantized.update(layers)
        release_freed_memory()
    _mark(model, mode)
    return model.eval().requires_grad_(False)


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing block by block frees a block's full-precision weights after allocating its int8 ones, and glibc
    keeps such holes in its heap: loading the 4.8B DiT in w8a8 with Gemma in int8 held 12.0 GB instead of the
    8.7 GB its weights need until trimmed. Trimming after each block keeps the loading peak down too."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator returns memory its own way
        return
    libc.malloc_trim(0)


class _Files:
    """Read tensors by key from a set of safetensors files, each opened once.

    A tensor read in the file's dtype is a view of the memory-mapped file: the streaming loaders copy every tensor
    (`.to(dtype, copy=True)`), so once the files close nothing keeps the mapping, and with it the page cache of
    the full-precision weights that were quantized away, in the process's resident memory."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._stack = contextlib.ExitStack()
        self.where: dict[str, Any] = {}
        for path in files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors has its own error types for bad files
                self._stack.close()
                raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
            for key in handle.keys():
                self.where[key] = handle

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def load_dit_quantizing(folder: Path, mode: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A plain DiT folder, quantized to `mode` while it is read (see `stream_quantized`). The result rests on the
    CPU, except int4 layers, which are packed on `device`."""
    from sana.config import read_config
    from sana.models.dit import SanaDiT

    config = read_config(SanaDiT.config_class, folder / CONFIG_NAME)
    with torch.device("meta"):
        model = SanaDiT(config)
    files = _weight_files(folder)
    check_keys(model, read_header(files), str(folder))  # every name and shape, before any tensor is read
    linearize_ffn(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with _Files(files) as f:
        return stream_quantized(
            model,
            lambda k: f.get(k).to(dtype, copy=True).reshape(shapes[k]),
            dit_targets(model, mode),
            mode,
            device,
        )


def load_gemma_quantizing(folder: Path, mode: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A Gemma-2 folder (transformers layout) read as `sana.models.gemma2.Gemma2Encoder`, quantized while read."""
    from sana.config import read_json
    from sana.models.gemma2 import CONFIG_FILE, Gemma2Config, Gemma2Encoder
    from sana.models.gemma2 import _weight_files as gemma_files

    config = Gemma2Config.from_dict(read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
    with torch.device("meta"):
        model = Gemma2Encoder(config)
    with _Files(gemma_files(folder)) as f:
        keys = {k.removeprefix("model."): k for k in f.where}
        missing = sorted(set(model.state_dict()) - set(keys))
        if missing:
            raise CheckpointError(f"{folder}: no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        read = lambda k: f.get(keys[k]).to(dtype, copy=True)
        return stream_quantized(model, read, text_targets(model, mode), mode, device)


# ----------------------------------------------------------------------------------------- quantized files


def save_quantized_weights(model: nn.Module, folder: Path) -> Path:
    """folder/quantized.safetensors: the state dict, quantized tensors flattened by torchao (tensors plus a JSON
    description of each in the header). Atomic."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    # Every name gets a prefix: torchao's reader splits each name at its last dot, and the DiT has top-level
    # tensors (scale_shift_table).
    state = {f"{_PREFIX}{k}": v.detach().to("cpu") for k, v in model.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = folder / QUANTIZED_WEIGHTS
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={**metadata, "format": "pt"}))
    return path


def _check_description(value: Any, path: Path) -> None:
    """Every type a quantized file's header names must be on the allow-list (recursively)."""
    if isinstance(value, dict):
        kind = value.get("_type")
        if kind == "torch.dtype" and value.get("_data") not in _ALLOWED_DTYPES:
            raise CheckpointError(f"{path}: unexpected dtype {value.get('_data')!r} in the quantization header")
        if kind is not None and kind not in _ALLOWED_TENSOR_TYPES | _ALLOWED_ATTRIBUTE_TYPES:
            raise CheckpointError(f"{path}: unexpected type {kind!r} in the quantization header")
        for item in value.values():
            _check_description(item, path)
    elif isinstance(value, list):
        for item in value:
            _check_description(item, path)


def read_quantized_weights(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of folder/quantized.safetensors, in `dtype` (a quantized tensor's scales and declared
    dtype too). Each tensor description is checked against the allow-list before torchao rebuilds it."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    torchao_quantization()
    path = folder / QUANTIZED_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no {QUANTIZED_WEIGHTS} in {folder} (a quantized folder holds one per component)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    try:
        names = json.loads(metadata["tensor_names"])
        described = {name: json.loads(metadata[name]) for name in names}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} has no readable torchao tensor description in its header") from None
    for name, description in described.items():
        kind = description.get("_type") if isinstance(description, dict) else None
        if kind not in _ALLOWED_TENSOR_TYPES:
            raise CheckpointError(
                f"{path}: {name} is a {kind!r}; allowed: {', '.join(sorted(_ALLOWED_TENSOR_TYPES))}"
            )
        _check_description(description, path)
    try:
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the quantized tensors: {e}") from None
    if leftover:
        raise CheckpointError(f"{path}: tensors without a description: {sorted(leftover)[:3]}")
    return {k.removeprefix(_PREFIX): _in_dtype(v, dtype) for k, v in state.items()}


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` computing in `dtype`: a plain float tensor cast; a quantized one rebuilt with its float parts (scales)
    cast and its declared dtype changed, its integer data untouched."""
    if not hasattr(t, "__tensor_flatten__"):
        return t.to(dtype) if t.is_floating_point() else t
    names, context = t.__tensor_flatten__()
    inner = {n: getattr(t, n) for n in names}
    inner = {n: (x.to(dtype) if x.is_floating_point() else x) for n, x in inner.items()}
    if isinstance(context, dict) and "dtype" in context:
        context = {**context, "dtype": dtype}
    return type(t).__tensor_unflatten__(inner, context, t.shape, t.stride())


def _fill(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:3])}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]  # fmt: skip
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {'; '.join(parts)}")
    for name, tensor in state.items():
        _assign(model, name, tensor)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------- model folders


def read_quantization(root: Path) -> dict[str, str | None]:
    """What a model folder's quantization.json says ({"transformer": mode or None, "text_encoder": ...}); {}
    for a folder that is not quantized."""
    from sana.config import read_json

    path = Path(root) / QUANTIZATION_FILE
    if not path.is_file():
        return {}
    data = read_json(path)
    modes = {"transformer": DIT_MODES, "text_encoder": TEXT_ENCODER_MODES}
    out = {}
    for part, allowed in modes.items():
        mode = data.get(part) if isinstance(data, dict) else "?"
        if mode is not None and mode not in allowed:
            raise CheckpointError(f"{path}: {part} must be null or one of {', '.join(allowed)}, got {mode!r}")
        out[part] = mode
    return out


def _effective_mode(root: Path, part: str, asked: str | None) -> tuple[str | None, bool]:
    """(mode, stored): the mode the part gets and whether the folder already holds it quantized."""
    stored = read_quantization(root).get(part)
    if stored is None:
        return asked, False
    if asked is not None and asked != stored:
        what = _COMPONENT_NAMES[part]
        raise UserError(
            f"{root} holds a {what} already quantized to {stored}: load it without asking for {asked}, or "
            f"quantize the original folder to {asked}"
        )
    return stored, True


def load_transformer(
    root: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    quantize: str | None = None,
    compute_device: torch.device | str | None = None,
) -> nn.Module:
    """root/transformer: plain (as `sana.weights.load_model`, onto `device`), quantized while read (`quantize`),
    or as a quantized folder stores it. Quantized weights are read on the CPU and rest there (int4 is packed on
    `compute_device`, default `device`; the pipeline's placement moves the rest). A mode the compute device
    cannot run fails before any weight is read."""
    from sana.config import read_config
    from sana.models.dit import SanaDiT
    from sana.weights import load_model

    device, dtype = torch.device(device), parse_dtype(dtype)
    compute_device = torch.device(compute_device or device)
    mode, stored = _effective_mode(root, "transformer", quantize)
    if mode is None:
        return load_model(SanaDiT, root / "transformer", dtype=dtype, device=device)
    check_mode(mode, "transformer", compute_device, dtype)
    if not stored:
        return load_dit_quantizing(root / "transformer", mode, dtype, compute_device)
    folder = root / "transformer"
    with torch.device("meta"):
        model = SanaDiT(read_config(SanaDiT.config_class, folder / CONFIG_NAME))
    linearize_ffn(model)
    model = _fill(model, read_quantized_weights(folder, dtype), str(folder))
    _mark(model, mode)
    return model


def load_text_model(
    root: Path, *, dtype: torch.dtype, compute_device: torch.device | str, quantize: str | None = None
) -> nn.Module | None:
    """root/text_encoder's language model, quantized (while read, or as stored; resting on the CPU, as
    `load_transformer`); None when it is neither asked for nor stored quantized (the caller loads it the usual
    way)."""
    from sana.config import read_json
    from sana.models.gemma2 import CONFIG_FILE, Gemma2Config, Gemma2Encoder, is_gemma2_folder

    compute_device, dtype = torch.device(compute_device), parse_dtype(dtype)
    mode, stored = _effective_mode(root, "text_encoder", quantize)
    if mode is None:
        return None
    check_mode(mode, "text_encoder", compute_device, dtype)
    folder = root / "text_encoder"
    if not is_gemma2_folder(folder):
        raise UserError(f"{folder}: only Gemma-2 text encoders can be quantized (config model_type gemma2)")
    if not stored:
        return load_gemma_quantizing(folder, mode, dtype, compute_device)
    config = Gemma2Config.from_dict(read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
    with torch.device("meta"):
        model = Gemma2Encoder(config)
    model = _fill(model, read_quantized_weights(folder, dtype), str(folder))
    _mark(model, mode)
    return model


# ------------------------------------------------------------------------------------------- sana quantize

_PLAIN_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pth")


def write_quantized_folder(
    source: str | Path,
    out: str | Path,
    *,
    transformer: str | None,
    text_encoder: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] = lambda message: None,
) -> Path:
    """A copy of the model folder `source` at `out` with the DiT and/or the text encoder quantized. Written
    into a temporary sibling folder and renamed at the end: `out` appears complete or not at all."""
    source, out, device = Path(source), Path(out), torch.device(device)
    if not transformer and not text_encoder:
        raise UserError("nothing to quantize: give a DiT mode, a text encoder mode, or both")
    stored = read_quantization(source)
    if stored:
        done = ", ".join(f"{_COMPONENT_NAMES[p]} {m}" for p, m in stored.items() if m)
        raise UserError(f"{source} is already quantized ({done}); quantize the original model folder instead")
    check_mode(transformer, "transformer", device, dtype)
    check_mode(text_encoder, "text_encoder", device, dtype)
    from sana.models.gemma2 import is_gemma2_folder

    if text_encoder and not is_gemma2_folder(source / "text_encoder"):
        raise UserError(f"{source / 'text_encoder'}: only Gemma-2 text encoders can be quantized")
    if transformer and not (source / "transformer" / CONFIG_NAME).is_file():
        raise CheckpointError(f"{source} has no transformer/{CONFIG_NAME}")
    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder for the quantized model")
    quantized = {"transformer": transformer, "text_encoder": text_encoder}

    def skip(folder: str, names: list[str]) -> set[str]:
        part = Path(folder).name if Path(folder).parent == source else None
        if part in quantized and quantized[part]:
            return {n for n in names if any(Path(n).match(p) for p in _PLAIN_WEIGHTS)}
        return {n for n in names if n.startswith(".")}  # temporary files of an interrupted save

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, tmp, ignore=skip)
        if transformer:
            progress(f"quantizing the DiT to {transformer}")
            model = load_dit_quantizing(source / "transformer", transformer, dtype, device)
            save_quantized_weights(model, tmp / "transformer")
            del model
        if text_encoder:
            progress(f"quantizing the text encoder to {text_encoder}")
            model = load_gemma_quantizing(source / "text_encoder", text_encoder, dtype, device)
            save_quantized_weights(model, tmp / "text_encoder")
            del model
        import torchao

        write_json(
            tmp / QUANTIZATION_FILE,
            {
                "format": FORMAT,
                **quantized,
                "dtype": str(dtype).removeprefix("torch."),
                "torchao": torchao.__version__,
            },
        )
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def iter_quantized(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) of every quantized weight of a model: what a report or a test counts."""
    for name, p in model.named_parameters():
        if hasattr(p, "__tensor_flatten__"):
            yield name, p


def text_encoder_from(model: nn.Module, tokenizer_dir: Path, instruction: str | None):
    """A `TextEncoder` around an already loaded (quantized) language model and the folder's tokenizer, read as
    `TextEncoder.from_pretrained` reads it."""
    from sana.errors import MissingFileError
    from sana.models.text_encoder import JsonTokenizer, TextEncoder

    if not Path(tokenizer_dir).is_dir():
        raise MissingFileError(f"tokenizer folder not found: {tokenizer_dir}")
    if (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tokenizer = JsonTokenizer(tokenizer_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return TextEncoder(model, tokenizer, instruction=instruction)


def quantize_pipeline_transformer(pipe: Any, mode: str) -> None:
    """Quantize a built pipeline's DiT in place (after a LoRA merge, which needs full-precision weights), where
    its weights are, then let its placement put it where it rests again. On a GPU the full-precision DiT is
    already there; only loading with `quantize=` avoids that."""
    check_mode(mode, "transformer", pipe.device, pipe.dtype)
    quantize_dit(pipe.transformer, mode, pipe.device)
    pipe.placement.place("transformer", pipe.transformer)
