"""GPU checks that a CPU cannot make: bf16/fp16 accuracy and GPU speed, ours against diffusers.

Run on a CUDA machine with diffusers installed:  python benchmarks/bench_gpu.py --out results.json
Same random weights in both implementations; accuracy is the relative L2 error of a half-precision forward
against the float32 forward of the same implementation (so the comparison is between precision policies,
not between implementations); speed is the median of interleaved timed runs (CUDA events).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from sana.config import config_to_dict
from sana.models.dcae import DCAE, DCAE_PRESETS
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.types import Conditioning, TextEmbeddings


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def gpu_time(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def interleaved(fns: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k] += gpu_time(fn, 1)
    return {k: statistics.median(v) for k, v in samples.items()}


def dit_pair(preset: str, layers: int | None):
    import diffusers

    cfg = DIT_PRESETS[preset]
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    torch.manual_seed(0)
    theirs = diffusers.SanaTransformer2DModel(**config_to_dict(cfg)).eval()
    ours = SanaDiT(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return cfg, theirs, ours


def dit_inputs(cfg, side: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    hidden = torch.randn(batch, 300, cfg.caption_channels, generator=g)
    mask = torch.zeros(batch, 300, dtype=torch.long)
    mask[:, :40] = 1
    t = torch.tensor([500.0] * batch)
    return x, t, hidden, mask


def run_dit(model, ours: bool, x, t, hidden, mask):
    if ours:
        return model(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    return model(x, hidden, t, encoder_attention_mask=mask).sample


@torch.inference_mode()
def dit_checks(preset: str, layers: int | None, side: int, rounds: int) -> dict:
    cfg, theirs, ours = dit_pair(preset, layers)
    x, t, hidden, mask = (v.cuda() for v in dit_inputs(cfg, side))
    res: dict = {"preset": preset, "layers": cfg.num_layers, "latent": side}
    refs = {}
    for name, model, is_ours in (("ours", ours, True), ("diffusers", theirs, False)):
        model.cuda().float()
        refs[name] = run_dit(model, is_ours, x, t, hidden, mask).float()
    res["fp32_ours_vs_diffusers"] = rel_err(refs["ours"], refs["diffusers"])
    for dtype in (torch.bfloat16, torch.float16):
        for name, model, is_ours in (("ours", ours, True), ("diffusers", theirs, False)):
            model.to(dtype)
            out = run_dit(model, is_ours, x.to(dtype), t, hidden.to(dtype), mask)
            res[f"{str(dtype)[6:]}_relerr_{name}"] = rel_err(out, refs[name])
            res[f"{str(dtype)[6:]}_finite_{name}"] = bool(torch.isfinite(out).all())
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    xb, hb = x.bfloat16(), hidden.bfloat16()
    med = interleaved(
        {
            "ours": lambda: run_dit(ours, True, xb, t, hb, mask),
            "diffusers": lambda: run_dit(theirs, False, xb, t, hb, mask),
        },
        rounds,
    )
    res["bf16_ms_ours"], res["bf16_ms_diffusers"] = med["ours"], med["diffusers"]
    res["bf16_ratio"] = med["ours"] / med["diffusers"]
    return res


@torch.inference_mode()
def dcae_checks(side: int, rounds: int) -> dict:
    import diffusers

    cfg = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderDC(**config_to_dict(cfg)).eval()
    ours = DCAE(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(1, 32, side, side, generator=torch.Generator().manual_seed(0)).cuda()
    sf = cfg.scaling_factor
    res: dict = {"latent": side}
    refs = {}
    ours.cuda().float()
    theirs.cuda().float()
    refs["ours"] = ours.decode(z).float()
    refs["diffusers"] = theirs.decode(z / sf).sample.float()
    res["fp32_ours_vs_diffusers"] = rel_err(refs["ours"], refs["diffusers"])
    for dtype in (torch.bfloat16, torch.float16):
        ours.to(dtype)
        theirs.to(dtype)
        out_o = ours.decode(z.to(dtype))
        out_t = theirs.decode((z / sf).to(dtype)).sample
        key = str(dtype)[6:]
        res[f"{key}_relerr_ours"], res[f"{key}_relerr_diffusers"] = (
            rel_err(out_o, refs["ours"]),
            rel_err(out_t, refs["diffusers"]),
        )
        res[f"{key}_finite_ours"] = bool(torch.isfinite(out_o).all())
        res[f"{key}_finite_diffusers"] = bool(torch.isfinite(out_t).all())
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    zb = z.bfloat16()
    med = interleaved({"ours": lambda: ours.decode(zb), "diffusers": lambda: theirs.decode(zb / sf)}, rounds)
    res["bf16_ms_ours"], res["bf16_ms_diffusers"] = med["ours"], med["diffusers"]
    res["bf16_ratio"] = med["ours"] / med["diffusers"]
    torch.cuda.reset_peak_memory_stats()
    ours.decode(zb)
    res["bf16_peak_gb_ours"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    theirs.decode(zb / sf)
    res["bf16_peak_gb_diffusers"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--only", choices=["dit-4k"], help="run one check only")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.only == "dit-4k":
        results["dit"] = [dit_checks("sana-600m-4k", 4, 128, args.rounds)]
        print(json.dumps(results, indent=1))
        return
    results["dit"] = [  # each check frees its models on return
        dit_checks("sana-600m-1024", None, 32, args.rounds),
        dit_checks("sana-1600m-1024", None, 32, args.rounds),
        dit_checks("sana-600m-4k", 4, 128, args.rounds),
    ]
    results["dcae"] = [dcae_checks(32, args.rounds), dcae_checks(64, max(3, args.rounds // 2))]
    print(json.dumps(results, indent=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
