"""Low-memory modes measured: weight bytes, peak memory of a generation, DiT speed and quality per mode, and the
memory-aware decode (issue 22). Random weights at the published configs; nothing is downloaded.

Models: Sana 600M (sana-600m-1024), 1.6B (sana-1600m-1024) and Sana-1.5 4.8B (sana-1.5-4.8b), each with the
Gemma-2-2B text encoder (its published config) and the dc-ae-f32c32-sana-1.0 autoencoder.
Modes: fp32, bf16 (compute dtype, nothing quantized); int8 (DiT and text encoder int8 weight-only), w8a8 (DiT
W8A8, text encoder int8 weight-only), int4 (both int4 weight-only; CUDA only), the quantized modes computing
in bf16; and the offload modes (CUDA only: on a CPU there is nothing to offload to).

Sections (`--only`, comma-separated; all by default):
  weights     exact bytes of each component per mode: the models built on the meta device and quantized there
              by torchao (no memory used), int4 from torchao's tile-packed layout arithmetic (it packs only on
              CUDA)
  generation  peak RSS of one 1024x1024 generation (one step, classifier-free guidance) per model and CPU mode,
              each in a fresh process loading a random-weight model folder written once (bf16 safetensors,
              under out/bench_memory/models): the peak while loading (anonymous memory, sampled: the
              safetensors files are memory-mapped, and their page cache counts in RSS but is not the process's
              to keep) and the peak of the generation itself (VmHWM after load, reset through
              /proc/self/clear_refs). The DiT forward of that step is timed too. A configuration whose weights
              would not fit in the memory available is skipped, with the reason.
  speed       DiT forward time per mode on a 2-block slice at the 600M and 1.6B widths, a 32x32 latent (1024^2),
              one guidance branch, rounds interleaved, median; ratio against fp32 and bf16 in the same process
  quality     relative error of the DiT velocity per mode against the float32 model, same slices and inputs
  shapes      the shipped model's `sana eval shapes` accuracy (400 prompts: --n-per-category 100 --seed 1000)
              unquantized, int8 and w8a8, and same-seed image differences on 16 of those prompts
  decode      the memory-aware decode of the real f32c32 config on this CPU at 1024^2, 2048^2 and 4096^2, as the
              pipeline decides it by default: tile or one pass, peak RSS (whole process, model included)
  gpu         (CUDA only) peak allocated memory of a 1024^2 generation per model, mode and offload mode, and the
              DiT step time of W8A8 against bf16 (torch.compile)

Each configuration's result is saved in out/bench_memory/results.json as soon as it is measured; a rerun skips
what is there (`--fresh` starts over), so an interrupted run resumes. Tables go to docs/benchmarks.md.

Run: `python benchmarks/bench_memory.py [--only weights,speed] [--fresh] [--no-write]` (nohup it: the whole run
takes hours on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from docs_section import write_section
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench_memory"
RESULTS = OUT / "results.json"
GB = 1e9
GIB = 2**30

MODELS = {"600M": "sana-600m-1024", "1.6B": "sana-1600m-1024", "4.8B": "sana-1.5-4.8b"}
DCAE_NAME = "dc-ae-f32c32-sana-1.0"
# google/gemma-2-2b-it's decoder, as Sana's text encoder uses it (Gemma2Model).
GEMMA_2_2B = {
    "model_type": "gemma2",
    "architectures": ["Gemma2Model"],
    "vocab_size": 256000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "attention_bias": False,
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    dtype: str  # compute dtype
    dit: str | None = None  # DiT quantization
    text: str | None = None  # text encoder quantization
    offload: str | None = None
    cuda_only: bool = False


MODES = {
    m.name: m
    for m in (
        Mode("fp32", "fp32"),
        Mode("bf16", "bf16"),
        Mode("int8", "bf16", "int8", "int8"),
        Mode("w8a8", "bf16", "w8a8", "int8"),
        Mode("int4", "bf16", "int4", "int4", cuda_only=True),
    )
}
OFFLOAD_MODES = [
    Mode("bf16 + offload model", "bf16", offload="model", cuda_only=True),
    Mode("bf16 + offload sequential", "bf16", offload="sequential", cuda_only=True),
    Mode("int8 + offload model", "bf16", "int8", "int8", offload="model", cuda_only=True),
    Mode("int8 + offload sequential", "bf16", "int8", "int8", offload="sequential", cuda_only=True),
    Mode("int4 + offload sequential", "bf16", "int4", "int4", offload="sequential", cuda_only=True),
]
CPU_MODES = [m for m in MODES.values() if not m.cuda_only]
CATEGORIES = ("single", "sized", "relation", "counting")  # the shapes benchmark's, in its tables' order
PROMPT = "a red fox sitting in the snow at sunset, detailed photo"


# ----------------------------------------------------------------------------------------------- results


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_result(key: str, value) -> None:
    """Checkpoint one configuration's result (atomically), so a rerun resumes after it."""
    results = load_results()
    results[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ memory


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


class AnonPeak:
    """The peak of the process's anonymous memory, sampled every 20 ms on a thread (file-backed pages of
    memory-mapped weight files are page cache the kernel may drop, not memory the process holds)."""

    def __init__(self) -> None:
        self.peak = status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, status("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status("RssAnon"))


# ------------------------------------------------------------------------------------------------ models


def dit_config(model: str):
    from sana.models.dit import DIT_PRESETS

    return DIT_PRESETS[MODELS[model]]


def meta_components(model: str):
    """(DiT, Gemma-2-2B, DC-AE) on the meta device."""
    from sana.models.dcae import DCAE, DCAE_PRESETS
    from sana.models.dit import SanaDiT
    from sana.models.gemma2 import Gemma2Config, Gemma2Encoder

    with torch.device("meta"):
        return (
            SanaDiT(dit_config(model)),
            Gemma2Encoder(Gemma2Config.from_dict(GEMMA_2_2B)),
            DCAE(DCAE_PRESETS[DCAE_NAME]),
        )


def int4_bytes(module: nn.Module, targets: dict[str, nn.Linear]) -> int:
    """Bytes of `module` with `targets` in torchao's tinygemm int4 layout (Int4TilePackedTo4dTensor): the
    weight padded to a multiple of 8 rows and 1024 input features, two values per byte, plus a bfloat16 scale
    and zero point per group of each row; layers no group size divides stay bfloat16; the rest in bfloat16."""
    from sana.quantization import int4_group

    total = sum(t.numel() * 2 for t in [*module.parameters(), *module.buffers()])
    for layer in targets.values():
        group = int4_group(layer)
        if group is None:
            continue
        n, k = layer.out_features, layer.in_features
        n_pad, k_pad = math.ceil(n / 8) * 8, math.ceil(k / 1024) * 1024
        total += n_pad * k_pad // 2 + (k_pad // group) * n_pad * 2 * 2 - n * k * 2
    return total


def weight_bytes_of(model: str, mode: Mode) -> dict[str, int]:
    """Exact bytes of each component in `mode` (meta device: nothing allocated)."""
    from sana.quantization import dit_targets, linearize_ffn, quantize_dit, quantize_text_model, text_targets
    from sana.quantization import weight_bytes as nbytes

    dtype = torch.float32 if mode.dtype == "fp32" else torch.bfloat16
    dit, gemma, vae = (m.to(dtype) for m in meta_components(model))
    out = {"vae": nbytes(vae)}
    if mode.dit == "int4":
        linearize_ffn(dit)
        out["transformer"] = int4_bytes(dit, dit_targets(dit, "int4"))
    else:
        out["transformer"] = nbytes(quantize_dit(dit, mode.dit) if mode.dit else dit)
    if mode.text == "int4":
        out["text_encoder"] = int4_bytes(gemma, text_targets(gemma, "int4"))
    else:
        out["text_encoder"] = nbytes(quantize_text_model(gemma, mode.text) if mode.text else gemma)
    return out


def section_weights(results: dict) -> None:
    for model in MODELS:
        for mode in MODES.values():
            key = f"weights/{model}/{mode.name}"
            if key not in results:
                save_result(key, weight_bytes_of(model, mode))
                log(f"{key}: {load_results()[key]}")


# ------------------------------------------------------------------------------------- model folders


def random_state(module: nn.Module, seed: int):
    """(name, bf16 tensor) of a random state dict for `module` (meta): N(0, 0.02) weights, zero biases, unit
    norm scales where a norm multiplies by its weight (Gemma's RMSNorm adds 1 to it)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if name.endswith("bias") or ("norm" in name and t.ndim == 1):
            value = torch.zeros(t.shape) if "layernorm" in name or "bias" in name else torch.ones(t.shape)
        else:
            value = torch.randn(t.shape, generator=g) * 0.02
        yield name, value.to(torch.bfloat16)


def write_shards(module: nn.Module, folder: Path, stem: str, seed: int, shard_bytes: int = 2 * 10**9) -> None:
    """Sharded safetensors with an index, as diffusers and transformers write big models."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shard, size, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"{stem}-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, value in random_state(module, seed):
        shard[name] = value
        size += value.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in module.state_dict().values())}}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


def model_folder(model: str) -> Path:
    """out/bench_memory/models/<model>: a random-weight Sana folder (bf16), written once; the text encoder,
    tokenizer and autoencoder are one shared copy."""
    from sana.pretrained import SchedulerSpec, write_instruction
    from sana.tiny import tiny_tokenizer
    from sana.weights import component_config

    shared, root = OUT / "models" / "shared", OUT / "models" / model
    dit, gemma, vae = meta_components(model)
    if not (shared / "done").is_file():
        log("writing the shared random-weight Gemma-2-2B, tokenizer and DC-AE")
        write_shards(gemma, shared / "text_encoder", "model", seed=1)
        (shared / "text_encoder" / "config.json").write_text(json.dumps(GEMMA_2_2B, indent=1))
        tiny_tokenizer().save_pretrained(shared / "tokenizer")  # real ids fit in the 256000-row table
        write_shards(vae, shared / "vae", "diffusion_pytorch_model", seed=2)
        (shared / "vae" / "config.json").write_text(json.dumps(component_config(vae), indent=1))
        (shared / "done").write_text("")
    if not (root / "done").is_file():
        log(f"writing the random-weight {model} DiT")
        write_shards(dit, root / "transformer", "diffusion_pytorch_model", seed=3)
        (root / "transformer" / "config.json").write_text(json.dumps(component_config(dit), indent=1))
        for part in ("text_encoder", "tokenizer", "vae"):
            if not (root / part).exists():
                (root / part).symlink_to(shared / part, target_is_directory=True)
        scheduler = SchedulerSpec().to_dict()
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
        index = {
            "_class_name": "SanaPipeline",
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", "GemmaTokenizer"],
            "transformer": ["diffusers", "SanaTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderDC"],
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=1))
        write_instruction(root, None)  # prompts encoded bare: the tokenizer is not Gemma's (see the docs)
        (root / "done").write_text("")
    return root


# -------------------------------------------------------------------------------------------- generation


def child_generation(model: str, mode_name: str, out: Path) -> None:
    """In a fresh process: load `model` in `mode`, generate one 1024^2 image with one step; write the record."""
    from sana.pipeline import SanaPipeline

    mode = MODES[mode_name]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start, base = time.perf_counter(), status("VmRSS")
    with AnonPeak() as load_peak:
        pipe = SanaPipeline.from_pretrained(
            model_folder(model), dtype=mode.dtype, quantize=mode.dit, quantize_text_encoder=mode.text
        )
    loaded, load_s = status("VmRSS"), time.perf_counter() - start
    forward_s, tiles = [], []
    clock = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a: clock.__setitem__("t", time.perf_counter()))
    pipe.transformer.register_forward_hook(lambda m, a, o: forward_s.append(time.perf_counter() - clock["t"]))
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, tile=None: (tiles.append(tile), decode(z, tile=tile))[1]
    reset_peak()
    start = time.perf_counter()
    pipe(PROMPT, seed=0, steps=1, height=1024, width=1024, guidance_scale=4.5, output_type="pt")
    record = {
        "process_start_rss": base,
        "load_anon_peak": load_peak.peak,
        "loaded_rss": loaded,
        "generation_peak_rss": status("VmHWM"),
        "load_s": load_s,
        "generation_s": time.perf_counter() - start,
        "dit_forward_s": forward_s[0],
        "decode_tile": tiles[0],
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(record))


def needed_bytes(model: str, mode: Mode, results: dict) -> int:
    """What a generation must hold at its peak, roughly: the weights in their mode, a full-precision block while
    quantizing, and 4 GB for activations, the decode and the runtime."""
    weights = sum(results[f"weights/{model}/{mode.name}"].values())
    return int(weights + 4 * GB)


def run_child(args: list[str], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stderr[-2000:]


def section_generation(results: dict) -> None:
    import psutil

    section_weights(results)
    results = load_results()
    for model in MODELS:
        for mode in CPU_MODES:
            key = f"generation/{model}/{mode.name}"
            if key in results:
                continue
            need, available = needed_bytes(model, mode, results), psutil.virtual_memory().available
            if need > available:
                reason = f"needs about {need / GB:.0f} GB, {available / GB:.0f} GB available"
                save_result(key, {"skipped": reason})
                log(f"{key}: skipped ({reason})")
                continue
            model_folder(model)
            log(f"{key}: running")
            out = OUT / f"gen-{model}-{mode.name}.json"
            out.unlink(missing_ok=True)
            code, err = run_child(["generation", model, mode.name, str(out)], timeout=6 * 3600)
            if code != 0 or not out.is_file():
                save_result(key, {"failed": f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}"})
                log(f"{key}: failed\n{err}")
                continue
            save_result(key, json.loads(out.read_text()))
            log(f"{key}: {load_results()[key]}")


# ------------------------------------------------------------------------------------- speed and quality

SLICE_BLOCKS = 2
VARIANTS = [("fp32", None), ("bf16", None), ("fp32", "int8"), ("fp32", "w8a8"), ("bf16", "int8"), ("bf16", "w8a8")]


def variant_name(dtype: str, mode: str | None) -> str:
    return f"{mode} ({dtype})" if mode else dtype


def slice_models(model: str):
    """The 2-block slice of `model` in every variant, with the same random weights (fp32 first)."""
    import copy

    from sana.models.dit import SanaDiT
    from sana.quantization import quantize_dit

    cfg = dataclasses.replace(dit_config(model), num_layers=SLICE_BLOCKS)
    torch.manual_seed(0)
    base = SanaDiT(cfg).eval()  # PyTorch's default init: every layer carries signal
    with torch.no_grad():
        for block in base.transformer_blocks:
            block.scale_shift_table.normal_(0, cfg.hidden_size**-0.5)
        base.scale_shift_table.normal_(0, cfg.hidden_size**-0.5)
    out = {}
    for dtype, mode in VARIANTS:
        m = copy.deepcopy(base).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
        out[variant_name(dtype, mode)] = quantize_dit(m, mode) if mode else m
    return cfg, out


def slice_inputs(cfg, dtype: torch.dtype):
    from sana.types import Conditioning, TextEmbeddings

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 32, 32, generator=g)  # 1024^2 / 32
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[:, :40] = 1  # a prompt's worth of valid caption positions
    hidden = torch.randn(1, 300, cfg.caption_channels, generator=g)
    return x.to(dtype), torch.tensor([500.0]), Conditioning(TextEmbeddings(hidden.to(dtype), mask))


def section_speed_quality(results: dict, rounds: int) -> None:
    for model in ("600M", "1.6B"):
        key = f"speed/{model}"
        if key in results:
            continue
        log(f"{key}: {SLICE_BLOCKS}-block slice, {len(VARIANTS)} variants, {rounds} rounds")
        cfg, models = slice_models(model)
        inputs = {n: slice_inputs(cfg, next(m.parameters()).dtype) for n, m in models.items()}
        with torch.inference_mode():
            outs = {n: m(*inputs[n]).float() for n, m in models.items()}  # also the warm-up
            ref = outs["fp32"]
            errors = {n: ((o - ref).norm() / ref.norm()).item() for n, o in outs.items()}
            times = {n: [] for n in models}
            names = list(models)
            for r in range(rounds):
                for n in names if r % 2 == 0 else names[::-1]:
                    start = time.perf_counter()
                    models[n](*inputs[n])
                    times[n].append(time.perf_counter() - start)
        medians = {n: statistics.median(t) for n, t in times.items()}
        save_result(key, {"seconds": medians, "relative_error": errors, "rounds": rounds})
        log(f"{key}: {medians} {errors}")


# ------------------------------------------------------------------------------------------------ shapes


def section_shapes(results: dict) -> None:
    from sana.pipeline import SanaPipeline
    from sana.pretrained import shipped_model
    from sana.shapes.evaluate import evaluate_shapes, make_prompts

    model = shipped_model()
    if model is None:
        save_result("shapes", {"skipped": "this build ships no model"})
        return
    specs = make_prompts(4, 1000, CATEGORIES)  # 16 prompts
    prompts, seeds = [s.text for s in specs], [1000 + i for i in range(len(specs))]
    images = {}
    for mode in (None, "int8", "w8a8"):
        name = mode or "fp32"
        key = f"shapes/{name}"
        pipe = SanaPipeline.from_pretrained(model, quantize=mode)
        with torch.inference_mode():
            images[name] = torch.cat(
                [pipe(p, seed=s, output_type="pt") for p, s in zip(prompts, seeds, strict=True)]
            )
        if key in results:
            continue
        log(f"{key}: sana eval shapes --n-per-category 100 --seed 1000")
        start = time.perf_counter()
        report = evaluate_shapes(pipe, n_per_category=100, seed=1000)
        record = {"overall": report.overall, "accuracy": report.accuracy, "seconds": time.perf_counter() - start}
        if mode:  # same-seed differences against fp32, in 0-255 pixel steps
            diff = ((images[name] - images["fp32"]).abs() * 127.5).flatten()
            record["pixel_diff"] = {
                "mean": diff.mean().item(),
                "p99": diff.kthvalue(int(0.99 * diff.numel())).values.item(),
                "max": diff.max().item(),
            }
        save_result(key, record)
        log(f"{key}: {record}")


# ------------------------------------------------------------------------------------------------ decode

DECODE_SIDES = (1024, 2048, 4096)


def child_decode(side: int, out: Path) -> None:
    """In a fresh process: the real f32c32 DC-AE (random weights, float32) decodes one side x side latent the way
    the pipeline decides by default on this machine."""
    from sana.generation import vae_tile_for
    from sana.models.dcae import DCAE, DCAE_PRESETS
    from sana.placement import Placement

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = DCAE_PRESETS[DCAE_NAME]
    torch.manual_seed(0)
    vae = DCAE(cfg).eval()
    z = torch.randn(1, cfg.latent_channels, side // 32, side // 32)
    with torch.inference_mode():
        vae.decode(z[:, :, :2, :2])  # allocator and kernels warmed up: not part of the decode's peak
    model_rss = status("VmRSS")
    headroom = Placement.build("cpu", torch.float32).headroom()
    tile = vae_tile_for("auto", vae, 1, side, side, headroom)
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        vae.decode(z, tile=tile)
    record = {
        "tile": tile,
        "headroom": headroom,
        "model_rss": model_rss,
        "peak_rss": status("VmHWM"),
        "seconds": time.perf_counter() - start,
    }
    out.write_text(json.dumps(record))


def section_decode(results: dict) -> None:
    for side in DECODE_SIDES:
        key = f"decode/{side}"
        if key in results:
            continue
        log(f"{key}: running")
        out = OUT / f"decode-{side}.json"
        out.unlink(missing_ok=True)
        code, err = run_child(["decode", str(side), str(out)], timeout=6 * 3600)
        if code != 0 or not out.is_file():
            save_result(key, {"failed": f"exit {code}: {err.strip()[-300:]}"})
            continue
        save_result(key, json.loads(out.read_text()))
        log(f"{key}: {load_results()[key]}")


# --------------------------------------------------------------------------------------------------- GPU


def child_gpu(model: str, mode_name: str, out: Path) -> None:
    """In a fresh process on CUDA: peak allocated memory of a 1024^2 generation (one step) in this mode."""
    from sana.pipeline import SanaPipeline

    mode = next(m for m in [*MODES.values(), *OFFLOAD_MODES] if m.name == mode_name)
    pipe = SanaPipeline.from_pretrained(
        model_folder(model),
        dtype=mode.dtype,
        device="cuda",
        quantize=mode.dit,
        quantize_text_encoder=mode.text,
        offload=mode.offload or (),
    )
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe(PROMPT, seed=0, steps=1, height=1024, width=1024, guidance_scale=4.5, output_type="pt")
    torch.cuda.synchronize()
    record = {
        "resident": resident,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "seconds": time.perf_counter() - start,
        "device": torch.cuda.get_device_name(),
    }
    out.write_text(json.dumps(record))


def child_gpu_speed(model: str, out: Path) -> None:
    """DiT forward at 1024^2 (batch 2: classifier-free guidance) on CUDA, bf16 against W8A8 and int8, each
    compiled with torch.compile; median of CUDA-event timed runs after warm-up."""
    from sana.models.dit import SanaDiT
    from sana.quantization import quantize_dit
    from sana.types import Conditioning, TextEmbeddings

    cfg = dit_config(model)
    times = {}
    for mode in (None, "w8a8", "int8", "int4"):
        torch.manual_seed(0)
        dit = SanaDiT(cfg).eval().to("cuda", torch.bfloat16)
        if mode:
            quantize_dit(dit, mode, "cuda")
        compiled = torch.compile(dit)
        x = torch.randn(2, cfg.in_channels, 32, 32, device="cuda", dtype=torch.bfloat16)
        mask = torch.zeros(2, 300, dtype=torch.long, device="cuda")
        mask[:, :40] = 1
        text = TextEmbeddings(torch.randn(2, 300, cfg.caption_channels, device="cuda", dtype=torch.bfloat16), mask)
        t = torch.tensor([500.0, 500.0], device="cuda")
        with torch.inference_mode():
            for _ in range(3):
                compiled(x, t, Conditioning(text))
            samples = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                compiled(x, t, Conditioning(text))
                b.record()
                torch.cuda.synchronize()
                samples.append(a.elapsed_time(b) / 1e3)
        times[mode or "bf16"] = statistics.median(samples)
        del dit, compiled
        torch.cuda.empty_cache()
    out.write_text(json.dumps({"seconds": times, "device": torch.cuda.get_device_name()}))


def section_gpu(results: dict) -> None:
    if not torch.cuda.is_available():
        log("gpu: no CUDA device here; skipped")
        return
    for model in MODELS:
        for mode in [m for m in MODES.values() if m.name != "fp32"] + OFFLOAD_MODES:
            key = f"gpu/{model}/{mode.name}"
            if key in results:
                continue
            out = OUT / f"gpu-{model}-{mode.name.replace(' ', '_')}.json"
            out.unlink(missing_ok=True)
            code, err = run_child(["gpu", model, mode.name, str(out)], timeout=3600)
            ok = code == 0 and out.is_file()
            save_result(key, json.loads(out.read_text()) if ok else {"failed": err.strip()[-300:]})
        key = f"gpu_speed/{model}"
        if key not in results:
            out = OUT / f"gpu-speed-{model}.json"
            code, err = run_child(["gpu_speed", model, str(out)], timeout=3600)
            ok = code == 0 and out.is_file()
            save_result(key, json.loads(out.read_text()) if ok else {"failed": err.strip()[-300:]})


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    import psutil
    import torchao

    return (
        f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB; "
        f"torch {torch.__version__}, torchao {torchao.__version__}, Python {platform.python_version()}"
    )


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def report(results: dict) -> str:
    lines = [
        "## Low-memory modes (`benchmarks/bench_memory.py`)",
        "",
        f"{datetime.date.today().isoformat()}; {machine()}. Random weights at the published configs (Sana 600M, "
        "1.6B, Sana-1.5 4.8B; Gemma-2-2B; dc-ae-f32c32-sana-1.0). Modes: fp32 and bf16 quantize nothing; int8 = "
        "DiT and text encoder int8 weight-only, w8a8 = DiT W8A8 and text encoder int8, int4 = both int4 "
        "weight-only, all three computing in bf16 (torchao; which layers each mode quantizes: "
        "[low-memory.md](low-memory.md)). GB = 10^9 bytes.",
        "",
        "### Weight bytes per component (exact)",
        "",
        "Built on the meta device and quantized there by torchao; int4 (which torchao packs only on CUDA) from "
        "its tile-packed layout: inputs padded to a multiple of 1024 features (1152 -> 2048, 2240 -> 3072), so "
        "at these widths an int4 DiT is only 12-25 % smaller than an int8 one.",
        "",
        "| model | mode | DiT (GB) | text encoder (GB) | DC-AE (GB) | total (GB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        for mode in MODES:
            w = results.get(f"weights/{model}/{mode}")
            if w:
                lines.append(
                    f"| {model} | {mode} | {gb(w['transformer'])} | {gb(w['text_encoder'])} | {gb(w['vae'])} | "
                    f"**{gb(sum(w.values()))}** |"
                )
    lines += [
        "",
        "### Peak memory of one 1024x1024 generation on this CPU",
        "",
        "One step with classifier-free guidance, then the decode (one pass or tiles, as the pipeline decides), "
        "each configuration in a fresh process. *Load peak*: the process's anonymous memory while loading "
        "(sampled; the weight files are memory-mapped and their page cache is left out). *After load*: the RSS "
        "then; weights read in their file's dtype (bf16 here) are the mapped file itself and count only once "
        "touched, in the generation peak. *Generation peak*: "
        "the RSS high-water mark from the end of loading to the image. *DiT step*: the one forward of that step "
        "(batch 2), in this configuration's own process (the machine is shared: the speed table below compares "
        "modes in one process). The prompt is encoded without the instruction prefix (the tokenizer is a small "
        "stand-in, so prompts are short).",
        "",
        "| model | mode | load peak (GB) | after load (GB) | generation peak (GB) | DiT step (s) | decode |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for model in MODELS:
        for mode in MODES.values():
            r = results.get(f"generation/{model}/{mode.name}")
            if mode.cuda_only:
                lines.append(f"| {model} | {mode.name} | - | - | - | - | CUDA only (not measured: no GPU here) |")
            elif r is None:
                lines.append(f"| {model} | {mode.name} | - | - | - | - | not run yet |")
            elif "skipped" in r or "failed" in r:
                lines.append(f"| {model} | {mode.name} | - | - | - | - | {r.get('skipped') or r.get('failed')} |")
            else:
                tile = "one pass" if r["decode_tile"] is None else f"tiles of {r['decode_tile']}"
                lines.append(
                    f"| {model} | {mode.name} | {gb(r['load_anon_peak'])} | {gb(r['loaded_rss'])} | "
                    f"**{gb(r['generation_peak_rss'])}** | {r['dit_forward_s']:.0f} | {tile} |"
                )
    lines += [
        "",
        "Offload modes need an accelerator to offload from (`--offload` on a CPU-only machine is an error); "
        "their GPU figures are not measured yet (no GPU was lent for this run).",
        "",
        "### DiT speed and quality per mode (block slices, this CPU)",
        "",
        f"A {SLICE_BLOCKS}-block slice at each model's width (random weights, PyTorch's default init), a 32x32 "
        "latent (1024x1024), one guidance branch, 300 caption positions of which 40 valid. Time: median of "
        "interleaved rounds in one process; ratio against fp32 and bf16. Error: relative L2 error of the "
        "velocity against the float32 slice (random weights and inputs: indicative, not the trained models').",
        "",
        "| width | variant | forward (s) | vs fp32 | vs bf16 | velocity error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model in ("600M", "1.6B"):
        r = results.get(f"speed/{model}")
        if not r:
            continue
        s, e = r["seconds"], r["relative_error"]
        for name in (variant_name(*v) for v in VARIANTS):  # the results file sorts its keys
            lines.append(
                f"| {model} | {name} | {s[name]:.2f} | {s[name] / s['fp32']:.2f} | {s[name] / s['bf16']:.2f} | "
                f"{e[name]:.1e} |"
            )
    shapes = {m: results.get(f"shapes/{m}") for m in ("fp32", "int8", "w8a8")}
    if shapes["fp32"] and "overall" in shapes["fp32"]:
        lines += [
            "",
            "### The shipped model quantized: prompt following and images",
            "",
            "`sana eval shapes --n-per-category 100 --seed 1000` (400 prompts, the README's) with the DiT "
            "quantized at load (`--quantize`), float32 compute; and the same-seed images of 16 of those prompts "
            "against the unquantized model's (absolute difference in 0-255 steps).",
            "",
            "| DiT | single | sized | relation | counting | overall | vs fp32 (points) | mean diff | 99th pct "
            "| max |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m, r in shapes.items():
            if not r or "overall" not in r:
                continue
            acc = r["accuracy"]
            d = r.get("pixel_diff")
            diffs = f"{d['mean']:.2f} | {d['p99']:.0f} | {d['max']:.0f}" if d else "- | - | -"
            delta = 100 * (r["overall"] - shapes["fp32"]["overall"])
            lines.append(
                f"| {m} | "
                + " | ".join(f"{100 * acc[c]:.0f} %" for c in CATEGORIES)
                + f" | **{100 * r['overall']:.1f} %** | "
                f"{delta:+.1f} | {diffs} |"
            )
    decodes = [(side, results.get(f"decode/{side}")) for side in DECODE_SIDES]
    if any(r for _, r in decodes):
        lines += [
            "",
            "### Memory-aware decoding on this CPU",
            "",
            "The real dc-ae-f32c32-sana-1.0 (random weights, float32, encoder and decoder held as a "
            "pipeline holds them) decoding one image, deciding as the pipeline does by default: one pass "
            "when the estimated peak fits in the memory free (on the CPU at most a quarter of the RAM), "
            "tiles otherwise. Peak: the whole process's RSS high-water mark, model included.",
            "",
            "| image | decision | model RSS (GB) | peak RSS (GB) | peak (GiB) | seconds |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for side, r in decodes:
            if r and "peak_rss" in r:
                tile = "one pass" if r["tile"] is None else f"tiles of {r['tile']} latents"
                lines.append(
                    f"| {side}x{side} | {tile} | {gb(r['model_rss'])} | **{gb(r['peak_rss'])}** | "
                    f"{r['peak_rss'] / GIB:.2f} | {r['seconds']:.0f} |"
                )
    gpu = {k: v for k, v in results.items() if k.startswith("gpu")}
    lines += ["", "### GPU", ""]
    if not gpu:
        lines.append(
            "Not measured yet: no GPU was lent for this run. On a CUDA machine, "
            "`python benchmarks/bench_memory.py --only gpu` fills this section: peak allocated memory of a "
            "1024x1024 generation per model, mode and offload mode (goals: 1.6B with Gemma-2-2B within 8 GB, "
            "4.8B within 12 GB), and the DiT step time of W8A8 against bf16 under torch.compile (goal: at "
            "most 0.6x)."
        )
    else:
        lines += ["| model | mode | resident (GB) | peak allocated (GB) | seconds |", "|---|---|---:|---:|---:|"]
        for key, r in sorted(gpu.items()):
            if key.startswith("gpu/") and "peak_allocated" in r:
                _, model, mode = key.split("/", 2)
                peak = gb(r["peak_allocated"])
                lines.append(f"| {model} | {mode} | {gb(r['resident'])} | **{peak}** | {r['seconds']:.1f} |")
        for key, r in sorted(gpu.items()):
            if key.startswith("gpu_speed/") and "seconds" in r:
                s = r["seconds"]
                ratios = ", ".join(f"{m} {s[m] / s['bf16']:.2f}x" for m in s if m != "bf16")
                lines.append(
                    f"\n{key.split('/')[1]} DiT step, {r['device']}: bf16 {s['bf16'] * 1e3:.0f} ms; {ratios}"
                )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main

SECTIONS = ("weights", "speed", "shapes", "decode", "generation", "gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    parser.add_argument("--fresh", action="store_true", help="forget saved results and measure again")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the speed section")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one configuration, in this fresh process: KIND ARGS... OUT_JSON
        kind, *values, out = args.child
        if kind == "decode":
            values = [int(values[0])]
        children = {"generation": child_generation, "decode": child_decode, "gpu": child_gpu}
        children["gpu_speed"] = child_gpu_speed
        children[kind](*values, Path(out))
        return
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    if args.fresh:
        RESULTS.unlink(missing_ok=True)
    from sana.quantization import torchao_quantization

    torchao_quantization()  # quietly, before anything else imports it
    for section in sections:
        results = load_results()
        {
            "weights": section_weights,
            "generation": section_generation,
            "speed": lambda r: section_speed_quality(r, args.rounds),
            "shapes": section_shapes,
            "decode": section_decode,
            "gpu": section_gpu,
        }[section](results)
        if not args.no_write:
            write_section("bench_memory", report(load_results()))
    print(report(load_results()))


if __name__ == "__main__":
    main()
