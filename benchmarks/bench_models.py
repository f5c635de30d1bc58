"""Speed of this project's models against diffusers, same weights, same process, interleaved.

Two workloads:
  * DiT forward: the 600M widths (C=1152, 36 linear-attention heads, 16x72 cross heads, FFN 2880), a 4-block
    slice, a 32x32 latent (1024 tokens), batch 2, 300 caption tokens of which 40 are valid;
  * DC-AE decode: the real dc-ae-f32c32-sana-1.0 config, a (1, 32, 16, 16) latent -> a 512x512 image.

Each model is built by diffusers with random weights; its state dict is loaded strictly into ours, so both run
the same numbers. After a warm-up, rounds alternate ours/theirs (the order flips every round so neither always
runs on a cache the other warmed), and the reported time is the median per model; ratio = ours / theirs, so
below 1.00 means this project is faster. The outputs are compared once as a sanity check.

The DiT's arithmetic rate is set against this machine's float32 matmul peak, measured in the same process as
the best median GFLOP/s over a few GEMM shapes (square ones and the DiT's own linear shapes).

Run: `make bench` or `python benchmarks/bench_models.py [--rounds N] [--threads T] [--no-write]`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from docs_section import write_section
from torch.utils.flop_counter import FlopCounterMode

from sana.config import config_to_dict
from sana.models.dcae import DCAE, DCAE_PRESETS
from sana.models.dit import DIT_PRESETS, DiTConfig, SanaDiT
from sana.types import Conditioning, TextEmbeddings

DIT_LAYERS, DIT_BATCH, DIT_SIDE, TEXT_LEN, TEXT_VALID = 4, 2, 32, 300, 40
DCAE_SIDE = 16


@dataclass
class Result:
    name: str
    ours_s: float
    theirs_s: float
    max_rel_err: float

    @property
    def ratio(self) -> float:
        return self.ours_s / self.theirs_s


@dataclass
class DitArithmetic:
    """FLOPs of one DiT forward with the realistic mask, as each implementation executes it."""

    ours: int  # analytic, at the valid caption length (ours drops positions every row masks)
    theirs: int  # analytic, at the full caption length (diffusers attends to every position)
    counted: int  # torch FlopCounterMode on ours; it has no rule for CPU SDPA, so it lacks QK^T and PV


# ------------------------------------------------------------------------------------------------- timing


def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(ours: Callable[[], object], theirs: Callable[[], object], rounds: int, warmup: int):
    """Median seconds of each callable over `rounds` alternating runs (order flipped every round)."""
    for _ in range(warmup):
        ours()
        theirs()
    t_ours, t_theirs = [], []
    for r in range(rounds):
        pair = [(ours, t_ours), (theirs, t_theirs)]
        for fn, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(_time_once(fn))
    return statistics.median(t_ours), statistics.median(t_theirs)


def progress(r: Result) -> Result:
    """One line per finished workload on stderr: a full run takes many minutes on a small machine."""
    print(f"  {r.name}: ours {r.ours_s:.2f} s, diffusers {r.theirs_s:.2f} s, ratio {r.ratio:.3f}", file=sys.stderr)
    return r


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: a scale-free agreement figure (1e-6 is float32 round-off on these sizes)."""
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------- matmul peak


def matmul_peak(repeats: int = 5) -> tuple[float, str]:
    """Best median float32 GEMM rate in GFLOP/s (2mnk / t) over a few shapes, and the shape that reached it.

    The candidates are large squares (the usual peak probe) and the DiT's own linears at 2048 tokens
    (q/k/v/out 1152->1152, the FFN expand 1152->5760 and project 2880->1152), so "fraction of peak" compares
    the model with the best this BLAS does on this machine, not with a datasheet number.
    """
    n_tok = DIT_BATCH * DIT_SIDE * DIT_SIDE
    shapes = [
        (2048, 2048, 2048),
        (3072, 3072, 3072),
        (n_tok, 1152, 1152),
        (n_tok, 1152, 5760),
        (n_tok, 2880, 1152),
    ]
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        for _ in range(2):
            torch.mm(a, b, out=out)
        t = statistics.median(
            _time_once(lambda a=a, b=b, out=out: torch.mm(a, b, out=out)) for _ in range(repeats)
        )
        rate = 2 * m * n * k / t / 1e9
        if rate > best:
            best, best_shape = rate, f"{m}x{k} @ {k}x{n}"
    return best, best_shape


# ------------------------------------------------------------------------------------------------ DiT


def dit_flops(cfg: DiTConfig, batch: int, side: int, text_len: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one DiT forward; elementwise ops, norms and softmax are not counted.

    B = batch, N = side^2 tokens, C = width, L = caption length, F = FFN hidden, h/d = linear-attention
    heads/dim, hc/dc = cross-attention heads/dim, T = caption channels, c_in / c_out latent channels:
      stems:   patch 2BN c_in C + time 2B(256C + C^2 + 6C^2) + caption 2BL(TC + C^2) + proj_out 2BN C c_out
      a block: self-attn projections 2BN 4C^2
               linear attention 2B h (2 N d^2 + N d)         (K^T V, Q (K^T V), and Q sum(K) for the normaliser)
               cross-attn 2BN 2C^2 + 2BL 2C^2 + 2B hc 2 N L dc   (q and out on N, k and v on L, QK^T and PV)
               Mix-FFN 2BN (C 2F + 9 2F + F C)                (1x1 expand, 3x3 depthwise, 1x1 project)
    L is the number of caption positions the implementation attends to: diffusers all of them (the mask is an
    additive bias), this project only those some row attends to (`sana.models.dit.drop_padding`).
    """
    b, n, c, lt = batch, side * side, cfg.hidden_size, text_len
    f, h, d = cfg.ffn_hidden, cfg.num_attention_heads, cfg.attention_head_dim
    hc, dc = cfg.num_cross_attention_heads, cfg.cross_attention_head_dim
    stems = (
        2 * b * n * cfg.in_channels * c
        + 2 * b * (256 * c + c * c + 6 * c * c)
        + 2 * b * lt * (cfg.caption_channels * c + c * c)
        + 2 * b * n * c * cfg.output_channels
    )
    block = (
        2 * b * n * 4 * c * c
        + 2 * b * h * (2 * n * d * d + n * d)
        + 2 * b * n * 2 * c * c
        + 2 * b * lt * 2 * c * c
        + 2 * b * hc * 2 * n * lt * dc
        + 2 * b * n * (c * 2 * f + 9 * 2 * f + f * c)
    )
    return stems + cfg.num_layers * block


def bench_dit(rounds: int, warmup: int) -> tuple[list[Result], DitArithmetic]:
    """Two caption masks: the realistic one (TEXT_VALID of TEXT_LEN positions) and, for reference, no padding
    at all. Returns the results, the FLOPs each model does for the realistic mask (ours skips the positions
    every row masks, diffusers attends to all of them) and FlopCounterMode's count for ours."""
    from diffusers import SanaTransformer2DModel

    cfg = replace(DIT_PRESETS["sana-600m-1024"], num_layers=DIT_LAYERS)
    torch.manual_seed(0)
    theirs = SanaTransformer2DModel(**config_to_dict(cfg)).eval()
    ours = SanaDiT(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(DIT_BATCH, cfg.in_channels, DIT_SIDE, DIT_SIDE, generator=g)
    t = torch.tensor([999.0, 500.0])[:DIT_BATCH]
    hidden = torch.randn(DIT_BATCH, TEXT_LEN, cfg.caption_channels, generator=g)
    results = []
    with torch.inference_mode():
        for name, valid in (("DiT forward", TEXT_VALID), ("DiT, no padding", TEXT_LEN)):
            mask = torch.zeros(DIT_BATCH, TEXT_LEN, dtype=torch.long)
            mask[:, :valid] = 1
            text = Conditioning(TextEmbeddings(hidden, mask))

            def run_ours(text=text):
                return ours(x, t, text)

            def run_theirs(mask=mask):
                return theirs(x, hidden, t, encoder_attention_mask=mask, return_dict=False)[0]

            err = max_rel_err(run_ours(), run_theirs())
            if valid == TEXT_VALID:
                with FlopCounterMode(display=False) as counter:
                    run_ours()
            ours_s, theirs_s = interleaved_medians(run_ours, run_theirs, rounds, warmup)
            results.append(progress(Result(name, ours_s, theirs_s, err)))
    flops = DitArithmetic(
        ours=dit_flops(cfg, DIT_BATCH, DIT_SIDE, TEXT_VALID),
        theirs=dit_flops(cfg, DIT_BATCH, DIT_SIDE, TEXT_LEN),
        counted=counter.get_total_flops(),
    )
    return results, flops


# ------------------------------------------------------------------------------------------------ DC-AE


def bench_dcae(rounds: int, warmup: int) -> Result:
    from diffusers import AutoencoderDC

    cfg = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    torch.manual_seed(0)
    theirs = AutoencoderDC(**config_to_dict(cfg)).eval()
    ours = DCAE(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(1, cfg.latent_channels, DCAE_SIDE, DCAE_SIDE, generator=torch.Generator().manual_seed(2))

    def run_ours():
        return ours.decode(z)  # ours owns the latent scaling

    def run_theirs():
        return theirs.decode(z / cfg.scaling_factor).sample

    with torch.inference_mode():
        err = max_rel_err(run_ours(), run_theirs())
        ours_s, theirs_s = interleaved_medians(run_ours, run_theirs, rounds, warmup)
    return progress(Result("DC-AE decode", ours_s, theirs_s, err))


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = "unknown CPU"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    import diffusers

    return (
        f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Python {platform.python_version()}"
    )


def report(results: list[Result], flops: DitArithmetic, peak: float, peak_shape: str, rounds: int) -> str:
    dit = results[0]
    rate, rate_theirs = flops.ours / dit.ours_s / 1e9, flops.theirs / dit.theirs_s / 1e9
    rows = "\n".join(
        f"| {r.name} | {r.ours_s * 1e3:.0f} | {r.theirs_s * 1e3:.0f} | **{r.ratio:.3f}** | {r.max_rel_err:.1e} |"
        for r in results
    )
    return f"""## Models against diffusers (`benchmarks/bench_models.py`)

{datetime.date.today().isoformat()}; {machine()}. float32, inference mode, the same random weights in both
models, median of {rounds} interleaved rounds after a warm-up. Ratio = ours / diffusers: below 1.00 this project
is faster. The machine is shared with other jobs, so single medians move by several percent between runs.

* **DiT forward**: 600M widths, {DIT_LAYERS}-block slice, {DIT_SIDE}x{DIT_SIDE} latent, batch {DIT_BATCH}, \
{TEXT_LEN} caption positions of which {TEXT_VALID} are valid (the text encoder pads prompts to {TEXT_LEN}).
* **DiT, no padding**: the same with all {TEXT_LEN} positions valid, for reference: here both models do the same
  arithmetic, so it isolates the implementation from the padding that this project skips.
* **DC-AE decode**: dc-ae-f32c32-sana-1.0, (1, 32, {DCAE_SIDE}, {DCAE_SIDE}) latent to a \
{DCAE_SIDE * 32}x{DCAE_SIDE * 32} image.

| workload | ours (ms) | diffusers (ms) | ratio | max rel. diff |
|---|---:|---:|---:|---:|
{rows}

Float32 matmul peak of this machine, measured in the same process: **{peak:.1f} GFLOP/s** (best median over GEMM
shapes, reached by {peak_shape}). DiT forward arithmetic (analytic, `dit_flops`): {flops.ours / 1e9:.1f} GFLOP
as this project runs it (torch's FlopCounterMode: {flops.counted / 1e9:.1f} without the SDPA products it does not
count on CPU), {flops.theirs / 1e9:.1f} GFLOP as diffusers runs it. Achieved: **{rate:.1f} GFLOP/s =
{rate / peak:.0%} of peak** (diffusers: {rate_theirs:.1f} GFLOP/s = {rate_theirs / peak:.0%}).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per model (median taken; >= 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--only", choices=("dit", "dcae"), help="run one workload (implies --no-write)")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)

    peak, peak_shape = matmul_peak()
    results: list[Result] = []
    flops = None
    if args.only in (None, "dit"):
        dit_results, flops = bench_dit(args.rounds, args.warmup)
        results += dit_results
    if args.only in (None, "dcae"):
        results.append(bench_dcae(args.rounds, args.warmup))
    # The peak is a best case: take it again after the models ran and keep the better of the two.
    peak, peak_shape = max((peak, peak_shape), matmul_peak())

    print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({peak_shape})")
    print(f"{'workload':<18}{'ours ms':>10}{'diffusers ms':>14}{'ratio':>8}{'max rel diff':>14}")
    for r in results:
        print(f"{r.name:<18}{r.ours_s * 1e3:>10.1f}{r.theirs_s * 1e3:>14.1f}{r.ratio:>8.3f}{r.max_rel_err:>14.1e}")
    if flops is not None:
        rate = flops.ours / results[0].ours_s / 1e9
        print(
            f"DiT: {flops.ours / 1e9:.1f} GFLOP (diffusers {flops.theirs / 1e9:.1f}, FlopCounterMode on ours "
            f"{flops.counted / 1e9:.1f}), {rate:.1f} GFLOP/s = {rate / peak:.1%} of peak"
        )
    for r in results:
        if r.max_rel_err > 1e-4:
            print(f"WARNING: {r.name}: outputs differ by {r.max_rel_err:.1e} of max |diffusers|")
    if not args.no_write and args.only is None and flops is not None:
        print(f"wrote {write_section('bench_models', report(results, flops, peak, peak_shape, args.rounds))}")


if __name__ == "__main__":
    main()
