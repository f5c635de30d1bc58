"""Offloading policies (sana/placement.py) observed while a pipeline runs, and the memory budget.

A CPU-only machine has one compute device, so the weights here rest on a second one: torch's "lazy"
(TorchScript) device, a real torch device backed by host memory, where tensors keep their exact values. The
models compute on the CPU and rest on "lazy", which is what offloading from an accelerator to the CPU looks like
with the roles of the devices swapped. Forward hooks record where every model's weights are while each model
(and each DiT block) runs; the images must be those of a pipeline that moves nothing.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch

import sana.placement
from sana.errors import UserError
from sana.pipeline import SanaPipeline
from sana.placement import (
    CPU_SHARE,
    ModelOffload,
    Offloaded,
    Placement,
    Resident,
    SequentialOffload,
    block_units,
    parse_memory,
)
from sana.quantization import quantize_dit
from sana.tiny import tiny_components

CPU = torch.device("cpu")
KW = dict(seed=0, steps=2, height=64, width=64, output_type="pt", guidance_scale=4.5)


@pytest.fixture(scope="module")
def rest() -> torch.device:
    try:
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
        torch.ones(1).to("lazy").cpu()
    except Exception as e:  # a torch build without the TorchScript lazy backend
        pytest.skip(f"no second torch device to offload to in this torch build: {e}")
    return torch.device("lazy")


def build(policies=None, *, quantized: bool = False) -> SanaPipeline:
    parts = tiny_components(seed=0)
    if quantized:
        quantize_dit(parts.transformer, "int8")
    placement = None if policies is None else Placement(CPU, torch.float32, policies)
    return SanaPipeline(parts.transformer, parts.vae, parts.text_encoder, parts.scheduler, placement=placement)


def device_of(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


class Recorder:
    """Where each model's (and each DiT block's) weights are while each of them runs."""

    def __init__(self, pipe: SanaPipeline) -> None:
        self.seen: list[tuple[str, dict[str, set[str]]]] = []
        models = {"text_encoder": pipe.text_encoder.model, "transformer": pipe.transformer, "vae": pipe.vae}
        self.models, self.blocks = models, list(pipe.transformer.transformer_blocks)
        watched = {name: m for name, m in models.items() if name != "vae"} | {"decoder": pipe.vae.decoder}
        watched |= {f"block{i}": b for i, b in enumerate(self.blocks)}
        for name, module in watched.items():
            # registered before any policy's hooks, so it runs while the module is where its policy put it
            module.register_forward_hook(lambda m, args, out, name=name: self.seen.append((name, self.now())))

    def now(self) -> dict[str, set[str]]:
        where = {name: device_of(m) for name, m in self.models.items()}
        return where | {f"block{i}": device_of(b) for i, b in enumerate(self.blocks)}

    def during(self, name: str) -> list[dict[str, set[str]]]:
        return [where for who, where in self.seen if who == name]


@pytest.fixture(scope="module")
def reference():
    return build()("a red cat", **KW)


def test_model_offload_brings_each_model_only_while_it_runs(rest, reference):
    pipe = build({c: ModelOffload(CPU, rest=rest) for c in ("text_encoder", "transformer", "vae")})
    recorder = Recorder(pipe)
    assert recorder.now()["transformer"] == {"lazy"}  # at rest after placing
    out = pipe("a red cat", **KW)
    assert torch.equal(out, reference)
    for running, others in [
        ("text_encoder", ("transformer", "vae")),
        ("transformer", ("text_encoder", "vae")),
        ("decoder", ("text_encoder", "transformer")),
    ]:
        seen = recorder.during(running)
        assert seen, running
        own = "vae" if running == "decoder" else running
        assert all(w[own] == {"cpu"} and all(w[o] == {"lazy"} for o in others) for w in seen), (running, seen)
    assert all(where == {"lazy"} for where in recorder.now().values())  # all back at rest


@pytest.mark.parametrize("quantized", [False, True])
def test_sequential_offload_moves_one_block_at_a_time(rest, reference, quantized):
    placement = Placement(
        CPU, torch.float32, {c: SequentialOffload(CPU, rest=rest) for c in ("text_encoder", "transformer")}
    )
    placement.policies["vae"] = ModelOffload(CPU, rest=rest)
    pipe = build(placement.policies, quantized=quantized)
    recorder = Recorder(pipe)
    out = pipe("a red cat", **KW)
    if quantized:  # int8 weights move like any others
        assert (out - reference).abs().mean() < 0.02
    else:
        assert torch.equal(out, reference)
    for i in range(len(recorder.blocks)):
        seen = recorder.during(f"block{i}")
        assert len(seen) == 2  # one forward per sampler step (classifier-free guidance runs as one batch)
        for where in seen:
            assert where[f"block{i}"] == {"cpu"}
            assert all(where[f"block{j}"] == {"lazy"} for j in range(len(recorder.blocks)) if j != i)
            assert where["text_encoder"] == where["vae"] == {"lazy"}
            assert "cpu" in where["transformer"] and "lazy" in where["transformer"]  # the trunk is here
    # Gemma's layers too: only one of them on the device at a time
    layers = pipe.text_encoder.model.layers
    assert len(block_units(pipe.text_encoder.model)) == len(layers) == 2
    assert all(where == {"lazy"} for where in recorder.now().values())


def test_offloaded_component_serves_one_call_at_a_time(rest):
    module = torch.nn.Linear(2, 2)
    policy = ModelOffload(CPU, rest=rest)
    policy.place(module)
    inside, overlap = [], []

    def use():
        with policy.use(module), policy.use(module):  # re-entrant: a DiT and its ControlNet share a policy
            inside.append(1)
            overlap.append(len(inside))
            assert module.weight.device.type == "cpu"
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=use) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert overlap == [1, 1, 1] and module.weight.device.type == "lazy"


# ------------------------------------------------------------------------------------- building placements


def test_offload_modes_build_their_policies_and_refuse_the_cpu():
    model = Placement.build("cuda", torch.bfloat16, offload="model")
    assert all(
        isinstance(p, ModelOffload) and not isinstance(p, SequentialOffload) for p in model.policies.values()
    )
    sequential = Placement.build("cuda:1", torch.bfloat16, offload="sequential")
    kinds = {c: type(p) for c, p in sequential.policies.items()}
    assert kinds == {"text_encoder": SequentialOffload, "transformer": SequentialOffload, "vae": ModelOffload}
    assert sequential.offloaded == ("text_encoder", "transformer", "vae")
    legacy = Placement.build("cpu", torch.float32, offload=("text_encoder",))  # --low-memory works anywhere
    assert isinstance(legacy.policies["text_encoder"], Offloaded)
    assert isinstance(legacy.policies["vae"], Resident)
    with pytest.raises(UserError, match="the compute device is the CPU: there is nothing to offload") as err:
        Placement.build("cpu", torch.float32, offload="sequential")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown offload mode 'layers'; choose one of model, sequential"):
        Placement.build("cuda", torch.float32, offload="layers")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8e9), ("7.5GiB", 7.5 * 2**30), ("512 MiB", 512 * 2**20), ("512M", 512e6), (1000, 1000), (None, None)],
)
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 GX", "-1GB", "0", True])
def test_bad_memory_sizes_are_one_line_errors(text):
    with pytest.raises(UserError, match="memory size"):
        parse_memory(text)


def test_headroom_is_what_is_free_under_the_budget(monkeypatch):
    monkeypatch.setattr(sana.placement, "device_memory", lambda device: (10 * 10**9, 2 * 10**9))
    assert Placement.build("cpu", torch.float32, max_memory="3GB").headroom() == 10**9  # 3 GB minus what is held
    assert Placement.build("cpu", torch.float32, max_memory="1GB").headroom() == 0
    share = int(min(10 * 10**9, CPU_SHARE * psutil.virtual_memory().total))
    assert Placement.build("cpu", torch.float32).headroom() == share  # a quarter of the RAM at most
    monkeypatch.setattr(sana.placement, "device_memory", lambda device: None)  # a device that cannot say
    assert Placement.build("cpu", torch.float32).headroom() is None
    assert Placement.build("cpu", torch.float32, max_memory=5).headroom() == 5
