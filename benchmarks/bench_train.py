"""Training throughput: this project's train_step against a plain rectified-flow loop on diffusers' transformer.

The workload: the 600M widths (C=1152, 36 linear-attention heads, 16x72 cross heads, FFN 2880), a 4-block
slice, 512px training (16x16x32 latents), batch 4, a cache-format batch (300 caption positions, valid lengths
300/200/120/60, zeros past them), float32, AdamW (lr 1e-4, no weight decay), gradient clipping at 1.0.

  ours:      make_flow_batch (logit-normal t, noise, caption dropout) -> sana.training.step.train_step
  reference: the same objective in a few lines over diffusers' SanaTransformer2DModel:
             t ~ sigmoid(N(0, 1)), x_t = (1 - t) x0 + t eps, loss = |model(x_t, 1000 t) - (eps - x0)|^2,
             backward, clip, AdamW step

Both models start from the same random weights (diffusers builds them, ours loads that state dict strictly),
in the same process; after warm-up the steps alternate ours/reference (order flipped every round) and the
median step time of each gives samples/s. ratio = ours / reference in samples/s (above 1.00: ours is faster).
The first step's losses are compared once (same weights, same draws) as a sanity check.

Run: `python benchmarks/bench_train.py [--rounds N] [--threads T] [--no-write]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_section import write_section

from sana.config import config_to_dict
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.training.config import FlowConfig, OptimConfig
from sana.training.optim import build_optimizer
from sana.training.step import FlowBatch, make_flow_batch, step_generator, train_step
from sana.types import TextEmbeddings

LAYERS, BATCH, SIDE, TEXT_LEN, VALID = 4, 4, 16, 300, (300, 200, 120, 60)
FLOW = FlowConfig(caption_dropout=0.1)
OPTIM = OptimConfig(lr=1e-4, grad_clip=1.0)


def cache_batch(channels: int, caption_channels: int) -> tuple[torch.Tensor, TextEmbeddings]:
    """What `kind: cache` yields for one batch: latents and caption embeddings zeroed past each caption."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, channels, SIDE, SIDE, generator=g)  # (B, 32, 16, 16)
    mask = (torch.arange(TEXT_LEN)[None] < torch.tensor(VALID)[:, None]).long()  # (B, L)
    hidden = torch.randn(BATCH, TEXT_LEN, caption_channels, generator=g) * mask[..., None]  # (B, L, 2304)
    return latents, TextEmbeddings(hidden, mask)


def reference_step(model, optimizer, batch: FlowBatch) -> float:
    """A plain rectified-flow training step (minRF's objective) on the diffusers transformer."""
    t = batch.t.reshape(-1, 1, 1, 1)
    x_t = (1 - t) * batch.x0 + t * batch.noise
    pred = model(
        x_t, encoder_hidden_states=batch.text.hidden, timestep=batch.t * 1000,
        encoder_attention_mask=batch.text.mask, return_dict=False,
    )[0]  # fmt: skip
    loss = F.mse_loss(pred, batch.noise - batch.x0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run(rounds: int, warmup: int) -> dict:
    from diffusers import SanaTransformer2DModel

    cfg = replace(DIT_PRESETS["sana-600m-512"], num_layers=LAYERS)
    torch.manual_seed(0)
    theirs = SanaTransformer2DModel(**config_to_dict(cfg)).train()
    ours = SanaDiT(cfg).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    # Same optimizer for both: AdamW over the same two groups (weight decay 0, so the split changes nothing).
    opt_ours, opt_theirs = build_optimizer(ours, OPTIM), build_optimizer(theirs, OPTIM)
    latents, text = cache_batch(cfg.in_channels, cfg.caption_channels)
    null = TextEmbeddings(torch.randn(1, 1, cfg.caption_channels), torch.ones(1, 1, dtype=torch.long))
    step = {"ours": 0, "theirs": 0}

    def draw(who: str) -> FlowBatch:
        step[who] += 1  # both sides see the same sequence of draws
        return make_flow_batch(latents, text, null, FLOW, step_generator(0, step[who], 0))

    def run_ours() -> float:
        return train_step(ours, [draw("ours")], opt_ours, grad_clip=OPTIM.grad_clip)["loss"]

    def run_theirs() -> float:
        return reference_step(theirs, opt_theirs, draw("theirs"))

    first = run_ours(), run_theirs()
    for _ in range(warmup):
        run_ours()
        run_theirs()
    times = {"ours": [], "theirs": []}
    for r in range(rounds):
        pair = [("ours", run_ours), ("theirs", run_theirs)]
        for who, fn in pair if r % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times[who].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()[0]  # other processes on the machine slow both sides; interleaving keeps it fair
    params = sum(p.numel() for p in ours.parameters())
    return {
        "ours_s": med["ours"],
        "theirs_s": med["theirs"],
        "loss": first,
        "params": params,
        "rounds": rounds,
        "load": load,
    }


def machine() -> str:
    import platform
    import re

    import diffusers

    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    cpu = found.group(1).strip() if found else "unknown CPU"
    return (
        f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Python {platform.python_version()}"
    )


def report(r: dict) -> str:
    ours, theirs = BATCH / r["ours_s"], BATCH / r["theirs_s"]
    return f"""## Training step (`benchmarks/bench_train.py`)

{datetime.date.today().isoformat()}, {machine()}. float32, {r["params"] / 1e6:.0f}M parameters (600M widths,
{LAYERS}-block slice), 512px (latents 32x{SIDE}x{SIDE}), batch {BATCH} from a cache-format batch ({TEXT_LEN}
caption positions), AdamW, gradient clipping 1.0; median of {r["rounds"]} interleaved steps after warm-up, same
starting weights. Load average {r["load"]:.1f} at the end: other processes slow both sides alike, so the ratio
is the figure to read. Ours = `make_flow_batch` + `train_step`; reference = the rectified-flow objective
written out over diffusers' `SanaTransformer2DModel`. First-step losses (same weights, same draws):
{r["loss"][0]:.5f} (ours), {r["loss"][1]:.5f} (reference).

| | step (s) | samples/s |
|---|---:|---:|
| ours | {r["ours_s"]:.2f} | {ours:.3g} |
| reference (diffusers) | {r["theirs_s"]:.2f} | {theirs:.3g} |
| **ratio ours / reference** | | **{ours / theirs:.3f}** |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per side (median taken; >= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.rounds, args.warmup)
    ours, theirs = BATCH / r["ours_s"], BATCH / r["theirs_s"]
    print(f"ours {r['ours_s']:.3f} s/step, {ours:.3g} samples/s")
    print(f"reference {r['theirs_s']:.3f} s/step, {theirs:.3g} samples/s (load average {r['load']:.1f})")
    print(f"ratio ours/reference {ours / theirs:.3f}; first-step losses {r['loss'][0]:.5f} / {r['loss'][1]:.5f}")
    if not args.no_write:
        print(f"wrote {write_section('bench_train', report(r))}")


if __name__ == "__main__":
    main()
