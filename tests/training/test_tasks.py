"""The task registry (sana/training/tasks.py) is the one place task names live: every entry's module exposes the
agreed pieces under the agreed names, the names it reports agree with it, and an unknown name is refused with
the registry's own list."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sana.config import ConfigError
from sana.training import tasks
from sana.training.config import RunConfig
from sana.training.task import Task
from sana.training.tasks import load_train_config, make_task, train_config_from_dict

TRAINING = Path(__file__).resolve().parents[2] / "sana" / "training"


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_entry_names_a_module_with_its_config_and_task(name):
    module = importlib.import_module(tasks.TASKS[name])
    assert tasks.task_module(name) is module
    assert isinstance(module.CONFIG, type) and issubclass(module.CONFIG, RunConfig)
    assert isinstance(module.TASK, type) and issubclass(module.TASK, Task) and module.TASK is not Task
    assert tasks.config_class(name) is module.CONFIG and tasks.task_class(name) is module.TASK
    task_field = {f.name: f for f in dataclasses.fields(module.CONFIG)}["task"]
    assert task_field.default == name  # a config built in code names its own task, the registry's name


def test_the_names_reported_are_the_registrys():
    from tests.test_imports import import_graph

    assert tuple(tasks.TASKS) == tasks.TASK_NAMES and tasks.DEFAULT_TASK in tasks.TASKS
    # config.py is the package's leaf: it imports nothing of sana.training (the registry sits above it)
    assert not [m for m in import_graph()["sana.training.config"] if m.startswith("sana.training")]
    assert len({tasks.TASKS[n] for n in tasks.TASKS}) == len(tasks.TASKS)  # one module per task
    minimal = {"run_dir": "runs/x", "max_steps": 1, "model": {"preset": "tiny"}, "data": {"path": "imgs"}}
    assert train_config_from_dict(minimal).task == tasks.DEFAULT_TASK  # no task: key


def test_an_unknown_task_is_a_one_line_config_error_listing_the_registry(tmp_path):
    names = ", ".join(map(repr, tasks.TASKS))
    for lookup in (tasks.task_module, tasks.config_class, tasks.task_class):
        with pytest.raises(ConfigError) as e:
            lookup("vae")
        assert str(e.value) == f"task must be one of {names}, got 'vae'"
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\nmax_steps: 1\ntask: vae\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert str(e.value) == f"task must be one of {names}, got 'vae'" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="task must be one of"):
        train_config_from_dict({"run_dir": "x", "max_steps": 1, "task": ["dit"]})  # not even a name


def test_make_task_builds_the_registered_class():
    cfg = train_config_from_dict({"run_dir": "runs/x", "max_steps": 1, "model": {"preset": "tiny"}})
    ctx = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)  # what a task reads of a DistContext
    task = make_task(cfg, ctx)
    assert type(task) is tasks.task_class(cfg.task) and task.cfg is cfg


def _task_name_uses(tree: ast.AST) -> list[str]:
    """Strings used the ways a second registry would use task names: compared against (`task == "dit"`), as
    dict keys, as the value of something called `task` (a field default, an assignment, a keyword argument), or
    as the default of `.get("task", ...)`. Other strings may coincide with a task name (the component folder
    "text_encoder") and are not counted."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            found += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.keyword):
            found += [node.value] if node.arg == "task" else []
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            named = any(isinstance(t, ast.Name) and t.id == "task" for t in targets)
            found += [node.value] if named and node.value is not None else []
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            found += node.args[1:] if node.args[0].value == "task" else []
    return [n.value for n in found if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_other_module_uses_a_task_name():
    """Outside the registry no code compares against, maps or defaults to a task name; a task module may name
    only itself (its config's `task` default)."""
    sample = 'task: str = "a"\ntask = "b"\nif x == "c": f(task="d", y={"e": 1}, z=data.get("task", "f"), w="g")'
    assert sorted(_task_name_uses(ast.parse(sample))) == ["a", "b", "c", "d", "e", "f"]
    own = {module.rsplit(".", 1)[1]: name for name, module in tasks.TASKS.items()}
    for path in sorted(TRAINING.glob("*.py")):
        if path.stem == "tasks":
            continue
        uses = _task_name_uses(ast.parse(path.read_text(), str(path)))
        foreign = sorted({u for u in uses if u in tasks.TASKS and u != own.get(path.stem)})
        assert not foreign, f"{path.name} uses task name(s) {foreign}; only the registry (tasks.py) may"


def test_asking_for_one_task_imports_no_other_task_module():
    code = (
        "import sys\n"
        "from sana.training.tasks import TASKS, config_class\n"
        "before = {m for m in TASKS.values() if m in sys.modules}\n"
        "config_class('dcae')\n"
        "print(sorted({m for m in TASKS.values() if m in sys.modules} - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['sana.training.dcae_task']"
