"""The run YAML: typed sections, unknown keys named with their dotted path, dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sana.config import ConfigError
from sana.training.config import apply_overrides, dump_yaml
from sana.training.dit_task import TrainConfig
from sana.training.tasks import load_train_config, train_config_from_dict

CONFIGS = Path(__file__).parents[2] / "configs" / "train"
MINIMAL = {"run_dir": "runs/x", "max_steps": 10, "model": {"preset": "tiny"}, "data": {"path": "imgs"}}


@pytest.mark.parametrize(
    "name",
    [
        "tiny.yaml",
        "sana_600m_512px.yaml",
        "shapes_dit.yaml",
        "shapes_dit_positions.yaml",
        "shapes_dit_refine.yaml",
        "shapes_dit_binding.yaml",
        "shapes_dit_restore.yaml",
        "shapes_dit_finish.yaml",
        "shapes_dit_count.yaml",
        "shapes_dit_groups.yaml",
        "shapes_dit_layout.yaml",
    ],
)
def test_example_configs_load(name):
    cfg = load_train_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig) and cfg.data.batch_size >= 1


def test_defaults_and_round_trip():
    cfg = train_config_from_dict(MINIMAL)
    assert cfg.optim.name == "adamw" and cfg.ema.enabled and cfg.distributed.strategy == "ddp"
    assert train_config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"optim": {"lrr": 1}}, r"unknown key optim\.lrr \(did you mean optim\.lr\?\)"),
        (
            {"data": {"path": "x", "batchsize": 2}},
            r"unknown key data\.batchsize \(did you mean data\.batch_size\?\)",
        ),
        ({"optimizer": {}}, r"unknown key optimizer \(did you mean optim\?\)"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr must be a number, got 'fast'"),
        ({"max_steps": 1.5}, r"max_steps must be an integer"),
        ({"precision": {"mixed": "fp8"}}, r"precision\.mixed must be one of 'no', 'bf16', 'fp16'"),
        ({"ema": {"enabled": "yes"}}, r"ema\.enabled must be true or false"),
        ({"model": {"preset": "tiny", "pretrained": "p"}}, r"exactly one of model\.preset"),
        ({"optim": {"name": "came", "betas": [0.9, 0.99]}}, r"came takes 3 betas"),
        ({"validation": {"every": 5}}, r"validation\.prompts must be set"),
    ],
)
def test_bad_values_name_the_dotted_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        train_config_from_dict({**MINIMAL, **extra})


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="missing key.*max_steps"):
        train_config_from_dict({"run_dir": "r", "model": {"preset": "tiny"}})


def test_dotted_overrides():
    data = apply_overrides(
        MINIMAL,
        ["optim.lr=1e-4", "validation.prompts=[a cat, a dog]", "ema.enabled=false", "optim.betas=[0.9, 0.95]",
         "validation.every=5", "data.batch_size=8"],
    )  # fmt: skip
    cfg = train_config_from_dict(data)
    assert cfg.optim.lr == 1e-4  # YAML reads "1e-4" as a string; float fields accept it
    assert cfg.validation.prompts == ("a cat", "a dog")
    assert cfg.ema.enabled is False and cfg.optim.betas == (0.9, 0.95) and cfg.data.batch_size == 8
    assert MINIMAL["model"] == {"preset": "tiny"} and "optim" not in MINIMAL  # the input is not modified
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(MINIMAL, ["optim.lr"])
    with pytest.raises(ConfigError, match="max_steps is not a section"):
        apply_overrides(MINIMAL, ["max_steps.x=1"])
    with pytest.raises(ConfigError, match=r"unknown key optim\.foo"):
        train_config_from_dict(apply_overrides(MINIMAL, ["optim.foo=1"]))


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    from sana.cli.main import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["train", str(path), "optim.lrr=1"]) == 2
    assert capsys.readouterr().err.strip() == ("sana train: error: unknown key optim.lrr (did you mean optim.lr?)")
    # Overrides after --resume CHECKPOINT are overrides too (argparse alone rejects them).
    assert main(["train", str(path), "--resume", "ckpt", "optim.lrr=1"]) == 2
    assert "unknown key optim.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["train", str(path), "--resume", "ckpt", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such run config" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(path), f"data.path={empty}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sana train: error: ") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ base: include


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_include_merges_mappings_and_replaces_other_values(tmp_path):
    from sana.training.config import read_yaml

    _write(tmp_path / "common.yaml", {
        **MINIMAL,
        "optim": {"lr": 1.0e-3, "grad_clip": 1.0, "betas": [0.9, 0.999]},
        "model": {"preset": "tiny", "overrides": {"sample_size": 8, "num_layers": 2}},
        "validation": {"every": 5, "prompts": ["a cat", "a dog"]},
    })  # fmt: skip
    run = _write(tmp_path / "run.yaml", {
        "base": "common.yaml",
        "max_steps": 20,
        "optim": {"lr": 2.0e-4, "betas": [0.8, 0.9]},
        "model": {"overrides": {"num_layers": 3}},
        "validation": {"prompts": ["a bird"]},
    })  # fmt: skip
    data = read_yaml(run)
    assert "base" not in data and data["max_steps"] == 20 and data["run_dir"] == "runs/x"
    assert data["optim"] == {"lr": 2.0e-4, "grad_clip": 1.0, "betas": [0.8, 0.9]}  # nested merge, list replaced
    assert data["model"] == {"preset": "tiny", "overrides": {"sample_size": 8, "num_layers": 3}}  # at any depth
    assert data["validation"] == {"every": 5, "prompts": ["a bird"]}  # a list replaces, never appends
    cfg = load_train_config(run, ["optim.lr=5e-5"])  # command-line overrides apply after the merge
    assert cfg.optim.lr == 5e-5 and cfg.optim.grad_clip == 1.0 and cfg.validation.prompts == ("a bird",)


def test_base_include_chains_and_resolves_paths_from_the_including_file(tmp_path, monkeypatch):
    # run.yaml -> common/mid.yaml -> common/deeper/root.yaml: each base path is relative to its own file.
    _write(tmp_path / "common" / "deeper" / "root.yaml", {**MINIMAL, "seed": 1, "optim": {"lr": 1.0e-3}})
    _write(tmp_path / "common" / "mid.yaml", {"base": "deeper/root.yaml", "seed": 2, "ema": {"decay": 0.99}})
    run = _write(tmp_path / "runs" / "run.yaml", {"base": "../common/mid.yaml", "ema": {"enabled": False}})
    cfg = load_train_config(run)
    assert cfg.seed == 2 and cfg.optim.lr == 1e-3 and cfg.max_steps == MINIMAL["max_steps"]
    assert cfg.ema.decay == 0.99 and cfg.ema.enabled is False
    monkeypatch.chdir(tmp_path / "runs")  # relative to the files, not to the working directory
    assert load_train_config("run.yaml") == cfg


def test_base_include_cycle_and_missing_base_are_one_line_config_errors(tmp_path):
    _write(tmp_path / "a.yaml", {"base": "b.yaml", **MINIMAL})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "seed": 1})
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml") as cycle:
        load_train_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", {"base": "./self.yaml", **MINIMAL})
    with pytest.raises(ConfigError, match="include cycle"):
        load_train_config(tmp_path / "self.yaml")
    _write(tmp_path / "orphan.yaml", {"base": "gone/common.yaml", **MINIMAL})
    with pytest.raises(ConfigError, match=r"orphan\.yaml: no such base file: .*gone/common\.yaml") as missing:
        load_train_config(tmp_path / "orphan.yaml")
    assert "\n" not in str(cycle.value) and "\n" not in str(missing.value)
    _write(tmp_path / "odd.yaml", {"base": ["a.yaml"], **MINIMAL})
    with pytest.raises(ConfigError, match="base must be a file name"):
        load_train_config(tmp_path / "odd.yaml")


def test_no_yaml_of_configs_train_is_a_base_only():
    """The fine-tunes' shared settings live in configs/train/common/, not among the runs that tests and users
    list with configs/train/*.yaml; each of the seven names it as its base."""
    common = CONFIGS / "common" / "shapes_dit_finetune.yaml"
    assert common.is_file() and not list(CONFIGS.glob("*common*.yaml"))
    for name in ("positions", "refine", "binding", "restore", "finish", "count", "groups"):
        assert yaml.safe_load((CONFIGS / f"shapes_dit_{name}.yaml").read_text())["base"] == (
            "common/shapes_dit_finetune.yaml"
        )
