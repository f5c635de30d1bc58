"""What a run reports: a CSV row per step (always), TensorBoard scalars (optional), a progress bar, a text log,
and a loss-curve PNG at the end. Only rank 0 reports; other ranks get a logger that does nothing.

Files in the run folder:
    metrics.csv    step, loss, grad_norm, lr, steps_per_s, samples_per_s, elapsed_s
    train.log      the lines printed during the run
    tensorboard/   event files, when TensorBoard is on
    loss.png       the loss curve (matplotlib when installed, else a small PIL drawing: no hard dependency)
On resume, rows after the checkpoint's step (the part of the run that is redone) are dropped from the CSV.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from pathlib import Path

from sana.training.config import LoggingConfig
from sana.weights import atomic_write

COLUMNS = ("step", "loss", "grad_norm", "lr", "steps_per_s", "samples_per_s", "elapsed_s")


class MetricsLogger:
    def __init__(
        self, run_dir: str | Path, cfg: LoggingConfig, *, start_step: int, max_steps: int, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.bar = self.writer = self._csv = None
        self._last_time, self._last_step, self._start = time.perf_counter(), start_step, time.perf_counter()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.run_dir / "train.log", "a")  # noqa: SIM115 (closed in close())
        truncate_csv(self.csv_path, start_step)
        new = not self.csv_path.is_file()
        self._csv = open(self.csv_path, "a", newline="")  # noqa: SIM115
        self._rows = csv.writer(self._csv)
        if new:
            self._rows.writerow(COLUMNS)
        if cfg.tensorboard or (cfg.tensorboard is None and importlib.util.find_spec("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        """A line for the console (above the progress bar) and train.log."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)
        self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._log_file.flush()

    def log(self, step: int, metrics: dict[str, float], samples: int) -> None:
        """Record one optimizer step; `samples` is the global number of images it used."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        row = {**metrics, "step": step, "steps_per_s": rate, "samples_per_s": rate * samples}
        row["elapsed_s"] = now - self._start
        self._rows.writerow([_fmt(row.get(c, float("nan"))) for c in COLUMNS])
        self._csv.flush()  # a killed run keeps every row it reported
        if self.bar is not None:
            self.bar.update(1)
            if step % self.cfg.every == 0:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")
        if self.writer is not None and step % self.cfg.every == 0:
            for key in ("loss", "grad_norm", "lr", "samples_per_s"):
                if key in row:
                    self.writer.add_scalar(f"train/{key}", row[key], step)

    def close(self) -> None:
        if not self.enabled:
            return
        for handle in (self.bar, self.writer, self._csv, self._log_file):
            if handle is not None:
                handle.close()
        self.enabled = False


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.8g}"


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as dicts of floats (step as int)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to `last_step` (0 keeps none): a resumed run rewrites what follows."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    if len(kept) == len(rows):
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    atomic_write(path, write)


# -------------------------------------------------------------------------------------------- loss plot


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (finite values only), for a readable curve from noisy per-step losses."""
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def plot_loss(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw loss against step (raw and smoothed) to a PNG; None when there is nothing to draw."""
    rows = [r for r in read_metrics(csv_path) if math.isfinite(r["loss"])]
    if len(rows) < 2:
        return None
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    smoothed = smooth(losses, max(1, len(losses) // 50))
    png_path = Path(png_path)
    if importlib.util.find_spec("matplotlib"):
        _plot_matplotlib(steps, losses, smoothed, png_path)
    else:
        _plot_pil(steps, losses, smoothed, png_path)
    return png_path


def _plot_matplotlib(steps, losses, smoothed, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps, smoothed, lw=1.5, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _plot_pil(steps, losses, smoothed, png_path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, margin = 800, 450, 50
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    x_of = lambda s: margin + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * margin)
    y_of = lambda v: h - margin - (v - lo) / (hi - lo) * (h - 2 * margin)
    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, losses, strict=True)], fill=(170, 190, 230), width=1)
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, smoothed, strict=True)], fill=(20, 60, 170), width=2)
    draw.text((margin, margin - 15), f"loss (max {hi:.4g})", fill="black")
    draw.text((margin, h - margin + 5), f"min {lo:.4g}   steps {steps[0]}-{steps[-1]}", fill="black")
    atomic_write(png_path, lambda tmp: image.save(tmp, format="PNG"))
