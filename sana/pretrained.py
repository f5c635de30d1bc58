"""A whole Sana model folder in the diffusers layout, read and written.

    model_index.json
    transformer/  config.json + diffusion_pytorch_model.safetensors   (SanaDiT)
    controlnet/   optional, the same files                           (SanaControlNet; SanaControlNetPipeline)
    vae/          config.json + diffusion_pytorch_model.safetensors   (DCAE)
    text_encoder/ a transformers Gemma-2 decoder folder
    tokenizer/    a transformers tokenizer folder
    scheduler/    scheduler_config.json                              (which sampler, which time shift)
    instruction.json   optional, ours: {"complex_human_instruction": null | "text"}
    sampling.json      optional, ours: {"steps": N, "guidance_scale": G}, what a call that names neither uses

The same folder loads in diffusers' `SanaPipeline.from_pretrained` (tested), and a folder diffusers wrote
loads here. A Hub id is fetched with huggingface_hub where a network exists; everything else is local.

The instruction (CHI) prefix is part of what a model was trained with, so a folder may say which one it
expects: `instruction.json` holds the text (or null: captions were encoded bare, as for the shipped shapes
model, whose small text encoder never saw an instruction). Without that file a model gets
`DEFAULT_INSTRUCTION`, as the published Sana models do. diffusers ignores the file; pass its value as
`complex_human_instruction` there (null -> None) to get the same image.

Likewise the number of steps a model needs is a property of the model: the published Sana folders sample well
with Flow-DPM-Solver at 20 steps (the default without the file), Sprint folders at 2 (the default for an
SCMScheduler), and a folder may declare its own in `sampling.json` (the shipped shapes model does; docs/shapes.md
says how its values were chosen). An explicit `steps=` / `--steps` always wins.
"""

from __future__ import annotations

import enum
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sana.config import ConfigError, read_config, read_json
from sana.errors import RuntimeFailure, UserError
from sana.models.controlnet import SanaControlNet
from sana.models.dcae import DCAE
from sana.models.dit import DiTConfig, SanaDiT
from sana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder
from sana.quantization import load_text_model, load_transformer, text_encoder_from
from sana.weights import CONFIG_NAME, CheckpointError, load_model, parse_dtype, save_model, write_json

# The scheduler config of the published Sana 1.0 folders (DPM-Solver++ 2M on flow sigmas).
_DPM_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": float("-inf"),  # written as -Infinity, as diffusers writes it
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
DEFAULT_STEPS = 20  # Flow-DPM-Solver's count in the paper (14-20); the published folders sample with it
DEFAULT_GUIDANCE = 4.5
SCM_STEPS = 2  # Sana-Sprint's usual count
SAMPLING_FILE = "sampling.json"
SAMPLING_KEYS = ("steps", "guidance_scale")
_SAMPLER_BY_CLASS = {
    "DPMSolverMultistepScheduler": "dpm",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "SCMScheduler": "scm",
}


@dataclass(frozen=True)
class SchedulerSpec:
    """What a model folder says about sampling: the default sampler, the flow time shift, and the steps and
    guidance scale of a call that does not choose them (sampling.json, else the sampler's usual ones)."""

    sampler: str = "dpm"  # "dpm" | "euler" | "scm"
    flow_shift: float = 3.0
    sigma_data: float = 0.5  # SCM (Sprint) only
    steps: int = None  # type: ignore[assignment]  # None -> the sampler's usual: SCM_STEPS or DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE

    def __post_init__(self) -> None:
        if self.steps is None:
            object.__setattr__(self, "steps", SCM_STEPS if self.sampler == "scm" else DEFAULT_STEPS)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "scheduler config") -> SchedulerSpec:
        name = data.get("_class_name")
        if name not in _SAMPLER_BY_CLASS:
            raise ConfigError(
                f"{source}: unsupported scheduler {name!r}; expected one of {list(_SAMPLER_BY_CLASS)}"
            )
        sampler = _SAMPLER_BY_CLASS[name]
        if sampler == "dpm" and not data.get("use_flow_sigmas", False):
            raise ConfigError(f"{source}: DPMSolverMultistepScheduler without use_flow_sigmas is not a flow model")
        shift = data.get("flow_shift") if sampler == "dpm" else data.get("shift", 1.0)
        return cls(
            sampler=sampler,
            flow_shift=float(shift or 1.0),
            sigma_data=float(data.get("sigma_data", 0.5)),
        )

    def sampling(self) -> dict[str, Any]:
        """The sampling.json this spec needs: only what differs from its scheduler's usual settings."""
        usual = SchedulerSpec(sampler=self.sampler)
        return {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) != getattr(usual, k)}

    def to_dict(self) -> dict[str, Any]:
        if self.sampler == "dpm":
            return {**_DPM_SCHEDULER, "flow_shift": self.flow_shift}
        if self.sampler == "euler":
            return {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "shift": self.flow_shift,
            }
        return {
            "_class_name": "SCMScheduler",
            "num_train_timesteps": 1000,
            "prediction_type": "trigflow",
            "sigma_data": self.sigma_data,
        }


@dataclass
class SanaComponents:
    """The loaded parts of a Sana model folder; any part may be absent when it was not asked for."""

    transformer: SanaDiT | None = None
    vae: DCAE | None = None
    text_encoder: TextEncoder | None = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    controlnet: SanaControlNet | None = None


PARTS = ("transformer", "vae", "text_encoder")
INSTRUCTION_FILE = "instruction.json"
_INSTRUCTION_KEY = "complex_human_instruction"


class _FromModel(enum.Enum):
    INSTRUCTION = "the instruction the model folder declares"


# `instruction=` default: what the folder's instruction.json says, else DEFAULT_INSTRUCTION.
MODEL_INSTRUCTION = _FromModel.INSTRUCTION
InstructionChoice = str | None | _FromModel


def choose_instruction(no_chi: bool = False, chi_file: str | None = None) -> InstructionChoice:
    """The CLIs' --no-chi / --chi-file flags as an `instruction=` value (neither: the model's own)."""
    from sana.models.text_encoder import load_instruction

    if no_chi and chi_file:
        raise UserError("--no-chi and --chi-file contradict each other: give one")
    return None if no_chi else load_instruction(chi_file) if chi_file else MODEL_INSTRUCTION


def model_instruction(root: Path) -> str | None:
    """The instruction a model folder declares in instruction.json; DEFAULT_INSTRUCTION without the file."""
    path = root / INSTRUCTION_FILE
    if not path.is_file():
        return DEFAULT_INSTRUCTION
    text = read_json(path).get(_INSTRUCTION_KEY, DEFAULT_INSTRUCTION)
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{path}: {_INSTRUCTION_KEY} must be a string or null, got {type(text).__name__}")
    return text


def write_instruction(folder: str | Path, instruction: str | None) -> None:
    """Declare the instruction a model folder was trained with (see the module docstring)."""
    write_json(Path(folder) / INSTRUCTION_FILE, {_INSTRUCTION_KEY: instruction})


# Where the package's own small model lives once it is trained and shipped (see the README).
SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "shapes-model"
# The shipped model's edge ControlNet (trained by configs/train/shapes_controlnet.yaml, docs/shapes.md).
SHIPPED_CONTROLNET_DIR = Path(__file__).parent / "assets" / "shapes-controlnet"


def shipped_model() -> Path | None:
    """The model folder shipped inside the package, or None if this build has none."""
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "model_index.json").is_file() else None


def shipped_controlnet() -> Path | None:
    """The edge ControlNet shipped for the shipped model, or None if this build has none."""
    return SHIPPED_CONTROLNET_DIR if (SHIPPED_CONTROLNET_DIR / CONFIG_NAME).is_file() else None


def default_model() -> Path:
    """The model used when none is named: the shipped one, or a one-line error saying how to get one."""
    model = shipped_model()
    if model is None:
        raise UserError(
            "no --model given and this build ships no model yet: pass --model with a Sana model folder "
            "(diffusers layout, e.g. one written by `sana demo` or `sana convert`) or a Hub id such as "
            "Efficient-Large-Model/Sana_600M_1024px_diffusers"
        )
    return model


class HubUnavailableError(RuntimeFailure, CheckpointError):
    """A Hub id could not be fetched for a reason that is not the id's (no network, a timeout, the Hub down):
    a runtime failure, not the user's mistake. Also a CheckpointError, for callers that catch that."""


def resolve_model_dir(path_or_id: str | Path) -> Path:
    """A local folder as is; otherwise an "org/name" Hub id, downloaded (cached) by huggingface_hub. A folder
    that does not exist or an id the Hub does not have is a CheckpointError (the user's mistake); a Hub that
    cannot be reached is a HubUnavailableError (a runtime failure)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not is_hub_id:
        raise CheckpointError(f"no such model folder: {path_or_id}")
    import huggingface_hub  # only when a Hub id is actually used
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(
            huggingface_hub.snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"{text} is not a local folder and could not be fetched from the Hub: {first}"
        # No such repository (or no access to a gated one), no such revision, a malformed id: the user's
        # mistake. Anything else (no network, a timeout, the Hub failing) is the machine's: a runtime failure.
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError)):
            raise CheckpointError(message) from e
        raise HubUnavailableError(message) from e


def load_components(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    parts: tuple[str, ...] = PARTS,
    instruction: InstructionChoice = MODEL_INSTRUCTION,
    controlnet: str | Path | None = None,
    quantize: str | None = None,
    quantize_text_encoder: str | None = None,
    compute_device: torch.device | str | None = None,
) -> SanaComponents:
    """Load the requested parts of a model folder (local path or Hub id) in `dtype` on `device`; the text
    encoder prefixes `instruction` (by default the folder's own, see `model_instruction`).

    quantize / quantize_text_encoder: torchao modes for the DiT / the text encoder (`sana.quantization`),
    applied while reading; a folder written by `sana quantize` loads as it was quantized. Quantized parts rest
    on the CPU (int4 packs on `compute_device`, default `device`).

    With the transformer comes a ControlNet: `controlnet` (a folder or Hub id, see `controlnet_dir`) if given,
    else the folder's own `controlnet/` if its model_index.json lists one. Its config is checked against the
    transformer's before any weight is read (a one-line ConfigError naming the field that differs)."""
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ValueError(f"unknown part(s) {bad}; choose from {PARTS}")
    root = resolve_model_dir(path_or_id)
    dtype = parse_dtype(dtype)
    index = read_json(root / "model_index.json")
    for part in parts:
        if part not in index:
            raise CheckpointError(f"{root}/model_index.json lists no {part}")
    control_dir = None
    if "transformer" in parts and (controlnet is not None or "controlnet" in index):
        control_dir = controlnet_dir(controlnet if controlnet is not None else root / "controlnet")
        check_controlnet_fits(control_dir, root / "transformer")
    out = SanaComponents(scheduler=_read_scheduler(root))
    if "transformer" in parts:
        out.transformer = load_transformer(
            root, dtype=dtype, device=device, quantize=quantize, compute_device=compute_device
        )
    if control_dir is not None:
        out.controlnet = load_model(SanaControlNet, control_dir, dtype=dtype, device=device)
    if "vae" in parts:
        out.vae = load_model(DCAE, root / "vae", dtype=dtype, device=device)
    if instruction is MODEL_INSTRUCTION:
        instruction = model_instruction(root)
    text_model = None
    if "text_encoder" in parts:
        text_model = load_text_model(
            root, dtype=dtype, compute_device=compute_device or device, quantize=quantize_text_encoder
        )
    if text_model is not None:
        out.text_encoder = text_encoder_from(text_model, root / "tokenizer", instruction)
    elif "text_encoder" in parts:
        out.text_encoder = TextEncoder.from_pretrained(
            root / "text_encoder", root / "tokenizer", dtype=dtype, device=device, instruction=instruction
        )
    return out


def controlnet_dir(path_or_id: str | Path) -> Path:
    """The ControlNet component folder of `path_or_id` (a local folder or Hub id): the folder itself when it holds
    a SanaControlNetModel's config.json, else its `controlnet/` (a pipeline folder as diffusers saves
    SanaControlNetPipeline, or what `sana convert` writes from an NVlabs ControlNet checkpoint)."""
    root = resolve_model_dir(path_or_id)
    for folder in (root, root / "controlnet"):
        config = folder / CONFIG_NAME
        if config.is_file() and read_json(config).get("_class_name") == SanaControlNet.diffusers_class_name:
            return folder
    raise CheckpointError(
        f"{path_or_id} is not a Sana ControlNet: neither it nor its controlnet/ holds a config.json of a "
        f"{SanaControlNet.diffusers_class_name}"
    )


def check_controlnet_fits(control_dir: Path, transformer_dir: Path) -> None:
    """A one-line ConfigError, from the two config files alone, if the ControlNet cannot steer the transformer."""
    config = read_config(SanaControlNet.config_class, control_dir / CONFIG_NAME)
    config.check_fits(read_config(DiTConfig, transformer_dir / CONFIG_NAME))


def _read_scheduler(root: Path) -> SchedulerSpec:
    path = root / "scheduler" / "scheduler_config.json"
    spec = SchedulerSpec.from_dict(read_json(path), source=str(path)) if path.is_file() else SchedulerSpec()
    return replace(spec, **read_sampling(root))


def read_sampling(root: Path) -> dict[str, Any]:
    """The folder's sampling.json, checked: {} without the file."""
    path = root / SAMPLING_FILE
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or set(data) - set(SAMPLING_KEYS):
        raise ConfigError(f"{path}: expected an object with some of {list(SAMPLING_KEYS)}, got {data!r}")
    steps, scale = data.get("steps", 1), data.get("guidance_scale", 1.0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"{path}: steps must be a positive integer, got {steps!r}")
    if not isinstance(scale, int | float) or isinstance(scale, bool):
        raise ConfigError(f"{path}: guidance_scale must be a number, got {scale!r}")
    return {k: float(v) if k == "guidance_scale" else v for k, v in data.items()}


def save_components(components: SanaComponents, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a complete diffusers-layout folder. Each file is replaced atomically."""
    missing = [p for p in PARTS if getattr(components, p) is None]
    if missing:
        raise ValueError(f"cannot save a model folder without: {', '.join(missing)}")
    folder = Path(folder)
    save_model(components.transformer, folder / "transformer", dtype=dtype)
    save_model(components.vae, folder / "vae", dtype=dtype)
    save_text_encoder(components.text_encoder, folder)
    if components.controlnet is not None:
        save_model(components.controlnet, folder / "controlnet", dtype=dtype)
    write_json(folder / "scheduler" / "scheduler_config.json", components.scheduler.to_dict())
    write_sampling(folder, components.scheduler)
    write_json(folder / "model_index.json", model_index(components))
    return folder


def write_sampling(folder: Path, spec: SchedulerSpec) -> None:
    """folder/sampling.json with what `spec` changes from its sampler's usual settings; none when nothing (an
    older save's file must not outlive its settings)."""
    sampling = spec.sampling()
    if sampling:
        write_json(folder / SAMPLING_FILE, sampling)
    else:
        (folder / SAMPLING_FILE).unlink(missing_ok=True)


def save_text_encoder(text_encoder: TextEncoder, folder: Path) -> None:
    # transformers writes its own files; write into fresh folders so no stale shard from an older save survives.
    for sub, obj in (("text_encoder", text_encoder.model), ("tokenizer", text_encoder.tokenizer)):
        tmp = folder / f".{sub}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp)
        shutil.rmtree(folder / sub, ignore_errors=True)
        tmp.rename(folder / sub)


def model_index(components: SanaComponents) -> dict[str, Any]:
    scheduler = components.scheduler.to_dict()["_class_name"]
    pipeline = "SanaSprintPipeline" if components.scheduler.sampler == "scm" else "SanaPipeline"
    extra = {}
    if components.controlnet is not None:
        pipeline = "SanaControlNetPipeline"
        extra["controlnet"] = ["diffusers", components.controlnet.diffusers_class_name]
    return {
        "_class_name": pipeline,
        **extra,
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", _transformers_name(components.text_encoder.model)],
        "tokenizer": ["transformers", _transformers_name(components.text_encoder.tokenizer)],
        "transformer": ["diffusers", components.transformer.diffusers_class_name],
        "vae": ["diffusers", components.vae.diffusers_class_name],
    }


def _transformers_name(obj: Any) -> str:
    """The transformers class a saved folder loads as (our own Gemma-2 reader writes Gemma2Model folders)."""
    return getattr(obj, "transformers_class_name", type(obj).__name__)
