"""High resolution on the CPU: DC-AE decode memory of one 4096x4096 image, and the 600M DiT's time per step.

Decode memory. One (1, 32, 128, 128) latent -> one 4096x4096 image with the published dc-ae-f32c32-sana-1.0
config (random weights, float32, inference mode), decoded by
  * this project with tiling (`DCAE.decode(z, tile=24)`, what the pipeline does above 2048 px),
  * diffusers' AutoencoderDC untiled, and with its `enable_tiling()` (512 px tiles, 448 px stride, blended).
Each decode runs in a fresh spawned process that builds the whole autoencoder (encoder and decoder, as a
pipeline holds it) and reports its peak resident set size (getrusage ru_maxrss), so no measurement inherits
another's heap. "Model" is the RSS after building the model, before decoding. An untiled diffusers decode of
4096^2 needs more memory than a 24 GB machine has; when the prediction from smaller decodes says it would not
fit in the available RAM it is not run, and the peak is extrapolated from the smaller decodes it did run
(`--untiled-sides`, default 1/4 and 1/2 the side; model + activations proportional to the pixel count) and
marked as such.

DiT step. One sampler step of the 600M model at 1024x1024 with classifier-free guidance is one forward of a
batch of 2 on a 32x32 latent (300 caption tokens, 40 valid). Both models are built by diffusers' code with
random weights and ours loads the same state dict; after a warm-up, rounds alternate ours/theirs (order flipped
every round), median per model; ratio = ours / diffusers.

Results go to the marked section of docs/benchmarks.md. `--json` saves this run's records and `--include` adds
records saved on another machine (each row names its machine).

Run: `python benchmarks/bench_highres.py [--side 4096] [--tile 24] [--skip-diffusers-untiled] [--no-write]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from docs_section import write_section

from sana.models.dcae_tiling import DEFAULT_TILE

DCAE_NAME = "dc-ae-f32c32-sana-1.0"
FIT_MARGIN = 0.8  # run an untiled decode only if its predicted peak is below this share of the available RAM
GB = 1e9

# ------------------------------------------------------------------------------------------------ machine


def machine() -> str:
    cpu = "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {psutil.cpu_count()} cores, {ram:.0f} GiB RAM, {torch.get_num_threads()} torch threads"


def versions() -> str:
    import diffusers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}"


# ------------------------------------------------------------------------------------------ decode memory


def decode_in_child(impl: str, side: int, tile: int, threads: int | None) -> dict:
    """Runs in a fresh spawned process: build the autoencoder, decode one side x side image, report."""
    if threads:
        torch.set_num_threads(threads)
    from sana.config import config_to_dict
    from sana.models.dcae import DCAE, DCAE_PRESETS

    cfg = DCAE_PRESETS[DCAE_NAME]
    torch.manual_seed(0)
    if impl == "ours":
        model = DCAE(cfg).eval()
        decode = lambda z: model.decode(z, tile=tile)
    else:
        from diffusers import AutoencoderDC

        model = AutoencoderDC(**config_to_dict(cfg)).eval()
        if impl == "diffusers-tiled":
            model.enable_tiling()
        decode = lambda z: model.decode(z / cfg.scaling_factor).sample  # ours divides inside decode
    z = torch.randn(1, cfg.latent_channels, side // 32, side // 32, generator=torch.Generator().manual_seed(1))
    model_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with torch.inference_mode():
        image = decode(z)
    seconds = time.perf_counter() - start
    assert image.shape == (1, 3, side, side), image.shape
    return {
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "model_bytes": model_rss,
        "seconds": seconds,
    }


@dataclasses.dataclass
class DecodeRecord:
    impl: str  # see `label`
    side: int
    peak_gb: float | None
    model_gb: float | None
    seconds: float | None
    machine: str
    note: str = ""


def run_child(impl: str, side: int, tile: int, threads: int | None) -> dict | None:
    """One measurement in its own spawned process; None if the process died (e.g. killed for memory)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(decode_in_child, impl, side, tile, threads).result()
        except concurrent.futures.process.BrokenProcessPool:
            return None


def label(impl: str, tile: int) -> str:
    return {"ours": f"ours, tiled (tile {tile} latents)", "diffusers": "diffusers, untiled"}.get(
        impl, "diffusers, enable_tiling()"
    )


def measure(impl: str, side: int, tile: int, threads: int | None, where: str) -> DecodeRecord:
    print(f"decoding {side}x{side} with {label(impl, tile)} in a fresh process ...", flush=True)
    r = run_child(impl, side, tile, threads)
    if r is None:
        return DecodeRecord(label(impl, tile), side, None, None, None, where, "process died (out of memory?)")
    rec = DecodeRecord(label(impl, tile), side, r["peak_bytes"] / GB, r["model_bytes"] / GB, r["seconds"], where)
    print(f"  peak {rec.peak_gb:.2f} GB (model {rec.model_gb:.2f} GB), {rec.seconds:.1f} s", flush=True)
    return rec


def predict(records: list[DecodeRecord], side: int) -> float:
    """Peak at `side` from measured ones: model + activations proportional to the pixel count; with two
    sizes the line through both, with one the line through it and its own model RSS."""
    (a, *rest) = sorted(records, key=lambda r: r.side)
    if rest:
        b = rest[-1]
        slope = (b.peak_gb - a.peak_gb) / (b.side**2 - a.side**2)
        return a.peak_gb + slope * (side**2 - a.side**2)
    return a.model_gb + (a.peak_gb - a.model_gb) * (side / a.side) ** 2


def measure_untiled(
    side: int,
    sides: list[int],
    threads: int | None,
    where: str,
    done: list[DecodeRecord],
    save: Callable[[], None],
) -> None:
    """diffusers untiled at each of `sides` (ascending), then at `side` if the prediction from those says it
    fits in the available RAM, else that prediction, marked as extrapolated; appends to `done`, saving each."""
    mine: list[DecodeRecord] = []
    for s in sides:
        mine.append(measure("diffusers", s, 0, threads, where))
        done.append(mine[-1])
        save()
        if mine[-1].peak_gb is None:
            return
    need, free = predict(mine, side), psutil.virtual_memory().available / GB
    if need > FIT_MARGIN * free:
        print(f"  not running {side}x{side} untiled: needs ~{need:.1f} GB, {free:.1f} GB available", flush=True)
        note = f"extrapolated from {', '.join(f'{r.side}²' for r in mine)}: not run, {free:.0f} GB available"
        done.append(DecodeRecord("diffusers, untiled", side, need, None, None, where, note))
    else:
        done.append(measure("diffusers", side, 0, threads, where))
    save()


def tiling_accuracy(side: int, tile: int, device: str) -> dict:
    """Mean / max absolute difference, ours tiled vs ours untiled, f32c32 with random weights (on `device`)."""
    from sana.models.dcae import DCAE, DCAE_PRESETS

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = DCAE(DCAE_PRESETS[DCAE_NAME]).eval().to(device)
    z = torch.randn(1, 32, side // 32, side // 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        diff = (model.decode(z, tile=tile) - model.decode(z)).abs()
    return {"side": side, "tile": tile, "device": device, "mean": diff.mean().item(), "max": diff.max().item()}


# ------------------------------------------------------------------------------------------------- DiT


def dit_step(layers: int, rounds: int, where: str) -> dict:
    from dataclasses import replace

    from diffusers import SanaTransformer2DModel

    from sana.config import config_to_dict
    from sana.models.dit import DIT_PRESETS, SanaDiT
    from sana.types import Conditioning, TextEmbeddings

    cfg = replace(DIT_PRESETS["sana-600m-1024"], num_layers=layers)
    torch.manual_seed(0)
    theirs = SanaTransformer2DModel(**config_to_dict(cfg)).eval()
    ours = SanaDiT(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 32, 32, generator=g)
    t = torch.tensor([999.0, 999.0])
    hidden = torch.randn(2, 300, cfg.caption_channels, generator=g)
    mask = torch.zeros(2, 300, dtype=torch.long)
    mask[:, :40] = 1
    text = Conditioning(TextEmbeddings(hidden, mask))
    run_ours = lambda: ours(x, t, text)
    run_theirs = lambda: theirs(x, hidden, t, encoder_attention_mask=mask, return_dict=False)[0]
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    with torch.inference_mode():
        a, b = run_ours(), run_theirs()  # warm-up, and a sanity check that both compute the same thing
        rel = ((a - b).abs().max() / b.abs().max()).item()
        for r in range(rounds):
            pair = [("ours", run_ours), ("theirs", run_theirs)]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                print(f"  DiT round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["theirs"])
    return {"layers": layers, "rounds": rounds, "ours_s": ours_s, "theirs_s": theirs_s, "max_rel_diff": rel,
            "machine": where}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def report(decodes: list[DecodeRecord], dit: dict | None, accuracy: list[dict], tile: int, side: int) -> str:
    rows = "\n".join(
        f"| {r.impl} | {r.side}² | **{fmt(r.peak_gb, '.2f')}** | {fmt(r.model_gb, '.2f')} | "
        f"{fmt(r.seconds, '.0f')} | {r.machine} | {r.note} |"
        for r in decodes
    )
    ours = [r for r in decodes if r.impl.startswith("ours") and r.side == side and r.peak_gb]
    goal = ""
    if ours:
        verdict = "meets" if ours[0].peak_gb <= 6 else "misses"
        goal = f"Goal: ours ≤ 6 GB at {side}² — **{verdict}** it ({ours[0].peak_gb:.2f} GB).\n"
    acc = "".join(
        f"* tiled (tile {a['tile']}) vs untiled at {a['side']}², f32c32 random weights, float32 on {a['device']}: "
        f"mean |diff| {a['mean']:.1e}, max {a['max']:.1e}.\n"
        for a in accuracy
    )
    dit_text = ""
    if dit:
        ratio = dit["ours_s"] / dit["theirs_s"]
        dit_text = f"""
### 600M DiT, one step at 1024² (batch 2 = CFG) against diffusers

600M widths (1152 wide, 36 linear-attention heads), {dit["layers"]} of the model's 28 blocks (the step time is
almost all blocks, so it scales with their number), 32x32 latent, 300 caption tokens (40 valid), float32, same
weights, same process, median of {dit["rounds"]} interleaved rounds after a warm-up; {dit["machine"]}.

| ours (s/step) | diffusers (s/step) | ratio ours/diffusers | max rel. diff |
|---:|---:|---:|---:|
| {dit["ours_s"]:.2f} | {dit["theirs_s"]:.2f} | **{ratio:.3f}** | {fmt(dit.get("max_rel_diff"), ".1e")} |
"""
    return f"""## High resolution (`benchmarks/bench_highres.py`)

{datetime.date.today().isoformat()}; {versions()}.

### DC-AE decode of one {side}x{side} image: peak resident memory

dc-ae-f32c32-sana-1.0 config, random weights, float32, CPU. Every decode runs in its own fresh process that
holds the whole autoencoder (1.25 GB of float32 weights); "peak" is that process's maximum RSS (ru_maxrss),
"model" its RSS before decoding. Ours tiles in {tile}x{tile} latents ({tile * 32} px) and gives the untiled
image up to float rounding (global attention sums are exact, convolutions get full halos: see
`sana/models/dcae_tiling.py`); diffusers' `enable_tiling()` blends independently decoded 512 px windows, which
changes the image.
{goal}
| decoder | image | peak (GB) | model (GB) | time (s) | machine | note |
|---|---:|---:|---:|---:|---|---|
{rows}

{acc}{dit_text}"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=4096, help="image side in pixels (multiple of 128)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="our decode tile, in latents")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-ours", action="store_true", help="no decode with this project's tiling")
    p.add_argument("--skip-diffusers-untiled", action="store_true", help="no untiled diffusers decodes")
    p.add_argument("--skip-diffusers-tiled", action="store_true", help="no diffusers enable_tiling() decode")
    p.add_argument(
        "--untiled-sides", default=None, help="diffusers untiled sides to measure (default: side/4,side/2)"
    )
    p.add_argument("--diffusers-tiled-side", type=int, default=None, help="side of that decode (default --side)")
    p.add_argument("--skip-dit", action="store_true", help="no DiT step timing")
    p.add_argument("--dit-layers", type=int, default=4, help="DiT blocks (the 600M model has 28)")
    p.add_argument("--rounds", type=int, default=5, help="timed DiT rounds per model (>= 5)")
    p.add_argument("--accuracy-side", type=int, default=0, help="also compare tiled/untiled at this side")
    p.add_argument("--accuracy-device", default="cpu", help="device for the accuracy comparison")
    p.add_argument("--machine-label", default=None, help="how rows from this run name the machine")
    p.add_argument("--json", type=Path, default=None, help="save this run's records here")
    p.add_argument("--include", type=Path, action="append", default=[], help="add records saved by --json")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    if args.side % 128 or args.rounds < 5:
        p.error("--side must be a multiple of 128 and --rounds at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = args.machine_label or machine()
    print(where, flush=True)

    decodes: list[DecodeRecord] = []
    accuracy: list[dict] = []
    dit = None

    def save() -> None:  # after every measurement, so an interrupted run keeps what it measured
        if args.json:
            data = {"decodes": [dataclasses.asdict(r) for r in decodes], "accuracy": accuracy, "dit": dit}
            args.json.write_text(json.dumps(data, indent=1))

    if not args.skip_dit:  # first: the short part
        dit = dit_step(args.dit_layers, args.rounds, where)
        print(f"DiT step: ours {dit['ours_s']:.2f} s, diffusers {dit['theirs_s']:.2f} s, "
              f"ratio {dit['ours_s'] / dit['theirs_s']:.3f}", flush=True)  # fmt: skip
        save()
    if not args.skip_ours:
        decodes.append(measure("ours", args.side, args.tile, args.threads, where))
        save()
    if not args.skip_diffusers_untiled:
        sides = (
            sorted(int(v) for v in args.untiled_sides.split(","))
            if args.untiled_sides
            else [args.side // 4, args.side // 2]
        )
        measure_untiled(args.side, sides, args.threads, where, decodes, save)
    if not args.skip_diffusers_tiled:
        decodes.append(measure("diffusers-tiled", args.diffusers_tiled_side or args.side, 0, args.threads, where))
        save()
    if args.accuracy_side:
        accuracy.append(tiling_accuracy(args.accuracy_side, args.tile, args.accuracy_device))
        print(accuracy[-1], flush=True)
        save()
    for path in args.include:
        other = json.loads(path.read_text())
        decodes += [DecodeRecord(**r) for r in other["decodes"]]
        accuracy += other["accuracy"]
        dit = dit or other["dit"]
    text = report(decodes, dit, accuracy, args.tile, args.side)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('bench_highres', text)}")


if __name__ == "__main__":
    main()
