"""Model folders: local paths, Hub ids (resolved through huggingface_hub), scheduler specs, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from sana.config import ConfigError
from sana.pretrained import SchedulerSpec, load_components, resolve_model_dir, save_components
from sana.tiny import tiny_components
from sana.weights import CheckpointError


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_dir("Efficient-Large-Model/Sana_600M_1024px_diffusers") == tmp_path
    assert calls == ["Efficient-Large-Model/Sana_600M_1024px_diffusers"]


def test_unreachable_hub_and_missing_folder_are_one_line_errors(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not be fetched from the Hub: We couldn't connect") as e:
        resolve_model_dir("org/model")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve_model_dir(tmp_path / "a" / "b")


def test_round_trip_of_all_parts(tmp_path):
    parts = tiny_components(seed=0)
    save_components(parts, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    loaded = load_components(tmp_path, dtype="bf16")
    for name in ("transformer", "vae"):
        ref = getattr(parts, name).state_dict()
        for k, v in getattr(loaded, name).state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].bfloat16()), k
    assert loaded.text_encoder.model.dtype == torch.bfloat16
    assert loaded.scheduler == SchedulerSpec(sampler="dpm", flow_shift=3.0)
    only = load_components(tmp_path, parts=("vae",))
    assert only.transformer is None and only.text_encoder is None and only.vae is not None
    with pytest.raises(ValueError, match="unknown part"):
        load_components(tmp_path, parts=("unet",))


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 6.0}, ("dpm", 6.0)),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, ("euler", 3.0)),
        ({"_class_name": "SCMScheduler", "sigma_data": 0.5}, ("scm", 1.0)),
    ],
)
def test_scheduler_specs_round_trip(config, expected):
    spec = SchedulerSpec.from_dict(config)
    assert (spec.sampler, spec.flow_shift) == expected
    assert SchedulerSpec.from_dict(spec.to_dict()) == spec


def test_scheduler_spec_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="unsupported scheduler 'DDIMScheduler'"):
        SchedulerSpec.from_dict({"_class_name": "DDIMScheduler"})
    with pytest.raises(ConfigError, match="not a flow model"):
        SchedulerSpec.from_dict({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": False})


def test_the_folder_declares_its_instruction(tmp_path):
    """instruction.json decides the CHI prefix unless the caller says otherwise; no file: the default text."""
    from sana.models.text_encoder import DEFAULT_INSTRUCTION
    from sana.pretrained import choose_instruction, model_instruction, write_instruction

    save_components(tiny_components(seed=0), tmp_path)
    assert model_instruction(tmp_path) == DEFAULT_INSTRUCTION
    assert load_components(tmp_path, parts=("text_encoder",)).text_encoder.instruction == DEFAULT_INSTRUCTION

    write_instruction(tmp_path, None)
    assert json.loads((tmp_path / "instruction.json").read_text()) == {"complex_human_instruction": None}
    assert load_components(tmp_path, parts=("text_encoder",)).text_encoder.instruction is None
    forced = load_components(tmp_path, parts=("text_encoder",), instruction="Describe: ")
    assert forced.text_encoder.instruction == "Describe: "

    write_instruction(tmp_path, "Say it well: ")
    assert model_instruction(tmp_path) == "Say it well: "
    (tmp_path / "instruction.json").write_text('{"complex_human_instruction": 3}')
    with pytest.raises(ConfigError, match="must be a string or null"):
        model_instruction(tmp_path)

    chi = tmp_path / "chi.txt"
    chi.write_text("Exactly this:\n")
    assert choose_instruction(no_chi=True) is None
    assert choose_instruction(chi_file=str(chi)) == "Exactly this:\n"
    assert choose_instruction() is not None and not isinstance(choose_instruction(), str)  # the model's own
    with pytest.raises(ValueError, match="contradict"):
        choose_instruction(no_chi=True, chi_file=str(chi))


def test_a_folder_declares_its_steps_and_guidance(tmp_path):
    """sampling.json: written only when the settings differ from the sampler's usual ones, read back into the
    scheduler spec, used by a pipeline call that names neither, and checked with a one-line error."""
    from dataclasses import replace

    from sana.pipeline import SanaPipeline
    from sana.pretrained import SAMPLING_FILE

    assert SchedulerSpec().steps == 20 and SchedulerSpec(sampler="scm").steps == 2
    parts = tiny_components(seed=0)
    save_components(parts, tmp_path)
    assert not (tmp_path / SAMPLING_FILE).exists()  # the usual 20 steps at 4.5
    parts.scheduler = replace(parts.scheduler, steps=3, guidance_scale=2.0)
    save_components(parts, tmp_path)
    assert json.loads((tmp_path / SAMPLING_FILE).read_text()) == {"steps": 3, "guidance_scale": 2.0}
    pipe = SanaPipeline.from_pretrained(tmp_path)
    assert (pipe.scheduler.steps, pipe.scheduler.guidance_scale) == (3, 2.0)
    seen = []
    image = pipe("a cat", seed=0, height=64, width=64, callback=seen.append)[0]
    assert len(seen) == 3 and json.loads(image.info["sana:parameters"])["guidance_scale"] == 2.0
    seen.clear()
    pipe("a cat", seed=0, steps=5, height=64, width=64, callback=seen.append)
    assert len(seen) == 5  # an explicit count wins

    (tmp_path / SAMPLING_FILE).write_text('{"steps": 0}')
    with pytest.raises(ConfigError, match="steps must be a positive integer") as e:
        load_components(tmp_path, parts=())
    assert "\n" not in str(e.value)
    (tmp_path / SAMPLING_FILE).write_text('{"stepz": 4}')
    with pytest.raises(ConfigError, match="expected an object with some of"):
        load_components(tmp_path, parts=())
    parts.scheduler = replace(parts.scheduler, steps=20, guidance_scale=4.5)
    save_components(parts, tmp_path)
    assert not (tmp_path / SAMPLING_FILE).exists()  # a stale declaration does not outlive a re-save
