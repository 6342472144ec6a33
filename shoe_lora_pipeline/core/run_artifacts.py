"""The training run's artefacts, read and written in one place.

A training output folder holds ``losses.csv`` (one row per optimizer step), ``validation_loss.csv`` (one
row per validation step), ``training_log_full.txt``, ``loss_curve.png``, ``training_summary.json`` and the
validation grids ``validation/grid_stepNNNNN.png``. Training writes them; export, evaluation and the
Dagster metadata read them through the functions here, so there is one parser, one smoothing and one plot.
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from shoe_lora_pipeline.core.fsutil import append_text, atomic_write_text

logger = logging.getLogger("shoe_lora_pipeline.core.training")

LOSSES_NAME = "losses.csv"
VALIDATION_LOSS_NAME = "validation_loss.csv"
SUMMARY_NAME = "training_summary.json"
LOG_NAME = "training_log_full.txt"
LOSS_CURVE_NAME = "loss_curve.png"
VALIDATION_DIR = "validation"
# What belongs to one training run (moved aside with its checkpoints when the settings change).
RUN_OUTPUTS = (LOSSES_NAME, VALIDATION_LOSS_NAME, SUMMARY_NAME, LOSS_CURVE_NAME, VALIDATION_DIR)
LOSSES_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "seconds"]
EMA_DECAY = 0.9  # smoothing of the noisy per-step diffusion loss (training log, plots, reports)
_GRID_RE = re.compile(r"grid_step(\d+)\.png$")

Row = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# losses.csv and validation_loss.csv
# ----------------------------------------------------------------------------------------------


def ema(values: Iterable[float], decay: float = EMA_DECAY) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else decay * out[-1] + (1 - decay) * v)
    return out


def _csv_lines(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """One line per row (floats in full precision: a resumed run compares them bit for bit)."""
    cell = lambda v: repr(v) if isinstance(v, float) else str(v)  # noqa: E731
    return "".join(",".join(cell(r.get(c, "")) for c in columns) + "\n" for r in rows)


def write_rows_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    """Write the whole file atomically (a resumed run starts from its checkpoint's rows)."""
    return atomic_write_text(path, ",".join(columns) + "\n" + _csv_lines(rows, columns))


def append_rows_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> None:
    """Append rows; a header is written first when the file is new (a kill leaves at most a torn last line)."""
    if not rows:
        return
    header = "" if Path(path).is_file() else ",".join(columns) + "\n"
    append_text(path, header + _csv_lines(rows, columns))


def read_rows_csv(path: Path | None, numeric: Callable[[str], Any] = float) -> list[Row]:
    """All complete rows with every value converted by ``numeric`` (``step``/``epoch`` as int).

    A torn last line of a killed run, or a row with a non-numeric value, is skipped.
    """
    if path is None or not Path(path).is_file():
        return []
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            try:
                row = {k: (int(float(v)) if k in ("step", "epoch") else numeric(v)) for k, v in raw.items()}
            except (TypeError, ValueError):
                continue
            rows.append(row)
    return rows


def write_losses_csv(path: Path, rows: Sequence[Row]) -> Path:
    return write_rows_csv(path, rows, LOSSES_COLUMNS)


def read_losses_csv(path: Path | None) -> list[Row]:
    """losses.csv rows (``step``, ``epoch`` int; ``loss``, ``lr``, ``grad_norm``, ``seconds`` float)."""
    return [r for r in read_rows_csv(path) if "loss" in r]


def loss_at_step(losses_csv: Path, step: int | None = None) -> float | None:
    """Loss of the last logged optimizer step at or before ``step`` (the final one when ``step`` is None)."""
    rows = [r for r in read_losses_csv(losses_csv) if step is None or r["step"] <= step]
    return rows[-1]["loss"] if rows else None


def read_validation_losses(path: Path | None) -> list[Row]:
    """validation_loss.csv rows: ``step`` and ``val_loss`` plus one ``t<timestep>`` column per timestep."""
    return [r for r in read_rows_csv(path) if "val_loss" in r]


def best_validation_step(rows: Sequence[Row]) -> int | None:
    """The step with the lowest validation loss (the earliest on a tie)."""
    return min(rows, key=lambda r: (r["val_loss"], r["step"]))["step"] if rows else None


# ----------------------------------------------------------------------------------------------
# validation grids
# ----------------------------------------------------------------------------------------------


def grid_step(path: Path) -> int:
    """The optimizer step a ``grid_stepNNNNN.png`` was drawn at (-1 for another name)."""
    m = _GRID_RE.search(Path(path).name)
    return int(m.group(1)) if m else -1


def validation_grids(output_dir: Path) -> list[Path]:
    """The training run's validation grids, oldest step first."""
    folder = Path(output_dir) / VALIDATION_DIR
    grids = [p for p in folder.glob("grid_step*.png") if grid_step(p) >= 0] if folder.is_dir() else []
    return sorted(grids, key=lambda p: (grid_step(p), p.name))


def latest_grid(output_dir: Path, at_or_before: int | None = None) -> Path | None:
    """The newest grid, or the newest drawn at or before a step (never one from after it)."""
    grids = [g for g in validation_grids(output_dir) if at_or_before is None or grid_step(g) <= at_or_before]
    return grids[-1] if grids else None


# ----------------------------------------------------------------------------------------------
# the loss plot
# ----------------------------------------------------------------------------------------------


def plot_loss_curve(
    rows: Sequence[Row],
    path: Path,
    *,
    validation: Sequence[Row] = (),
    threshold: float | None = None,
) -> Path | None:
    """Training loss and its EMA against the optimizer step, the validation loss beside it when measured,
    and a checklist threshold line when given (matplotlib's Agg canvas: no pyplot global state)."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="training loss")
    ax.plot(steps, ema(losses), color="tab:blue", linewidth=2, label=f"training loss EMA ({EMA_DECAY})")
    if validation:
        ax.plot(
            [r["step"] for r in validation],
            [r["val_loss"] for r in validation],
            color="tab:orange",
            marker="o",
            linewidth=2,
            label="validation loss (held-out val split)",
        )
    if threshold is not None:
        ax.axhline(
            threshold, color="tab:red", linestyle="--", linewidth=1, label=f"checklist < {threshold:g}"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# the run log and the step clock
# ----------------------------------------------------------------------------------------------


class RunLog:
    """``training_log_full.txt`` (appended across resumes) mirrored to the python logger and, when given,
    to ``echo`` (the Dagster run log) for lines at INFO and above.

    Each line is appended and closed at once: nothing is lost if the process is killed, and no file handle
    outlives an exception.
    """

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.echo = echo

    def write(self, line: str, level: int = logging.INFO) -> None:
        append_text(self.path, line + "\n", fsync=False)
        logger.log(level, line)
        if self.echo is not None and level >= logging.INFO:
            self.echo(line)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepClock:
    """Times optimizer steps without a host sync per step: the loop reads the device only at logging points
    (:meth:`settle`), so each step of a window gets the window's mean time. Training time excludes what
    happens between windows (checkpoints, validation: :meth:`resume`); the s/it and ETA use wall time over
    the last ``window`` steps, that work included."""

    def __init__(self, window: int = 20) -> None:
        self.windows: list[tuple[int, float]] = []  # (steps, training seconds) per logging window
        self._recent: deque[float] = deque(maxlen=window)
        self._window_start = self._last_settle = time.perf_counter()

    def settle(self, steps: int) -> float:
        """``steps`` steps ended now; returns their mean training seconds."""
        now = time.perf_counter()
        per_step = (now - self._window_start) / steps
        self.windows.append((steps, now - self._window_start))
        self._recent.extend([(now - self._last_settle) / steps] * steps)
        self._window_start = self._last_settle = now
        return per_step

    def resume(self) -> None:
        """Training time counts again from here (after checkpoint/validation work)."""
        self._window_start = time.perf_counter()

    @property
    def seconds_per_step(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def eta_seconds(self, steps_left: int) -> float:
        return steps_left * self.seconds_per_step

    def throughput(self, images_per_step: int) -> tuple[float | None, float | None]:
        """(mean seconds per optimizer step, images per second) over the run's steps, the first logging
        window left out when there are more (it holds the warm-up: compilation, the allocator's growth)."""
        measured = self.windows[1:] if len(self.windows) > 1 else self.windows
        steps, seconds = sum(n for n, _ in measured), sum(t for _, t in measured)
        if not steps or seconds <= 0:
            return None, None
        return seconds / steps, images_per_step * steps / seconds


def progress_line(
    step: int, max_steps: int, clock: StepClock, epoch: int, loss: float, lr: float, extra: str = ""
) -> str:
    eta = format_eta(clock.eta_seconds(max_steps - step))
    return (
        f"Steps: {step}/{max_steps} | {clock.seconds_per_step:.2f} s/it | ETA {eta} | epoch {epoch} | "
        f"loss {loss:.4f} | lr {lr:.2e}" + (f" | {extra}" if extra else "")
    )
