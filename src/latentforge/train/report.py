"""What a run leaves behind for a human: metrics.jsonl, tensorboard logs/, report.md and loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import io
from ..errors import UserError


class RunLog:
    """Append-only metrics (JSON lines + tensorboard). A no-op on ranks other than 0."""

    def __init__(self, run_dir, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self._tb = enabled, None
        if enabled and resume_step is not None and self.path.exists():
            # Rows logged after the checkpoint we resume from belong to the lost attempt: drop them.
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            io.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        elif enabled and resume_step is None and self.path.exists():
            self.path.unlink()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "logs"), purge_step=resume_step)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"  # val_loss -> val/loss
                self._tb.add_scalar(tag, v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (the process died mid-append) is skipped, not an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON — the log is damaged; delete that line") from None
    return rows


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_drop(rows: list[dict], window: int = 20) -> tuple[float, float, float]:
    """(first, last, relative drop) of the smoothed loss over the finite rows."""
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if not losses:
        return float("nan"), float("nan"), float("nan")
    w = max(1, min(window, len(losses) // 4))
    first, last = sum(losses[:w]) / w, sum(losses[-w:]) / w
    return first, last, (first - last) / first if first else float("nan")


def _finite(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def progress_verdict(rows: list[dict], val_key: str = "val_loss", tolerance: float = 0.02) -> str:
    """One line on whether more training would help: from the held-out loss when there are ≥ 3 evaluations
    (rising past the best by more than `tolerance` = overfitting; no new best in the last half = stopped
    improving), else from the training loss over the last fifth of the run (still falling by more than
    `tolerance` = more steps would help)."""
    val = _finite(rows, val_key)
    if len(val) >= 3:
        best_step, best = min(val, key=lambda sv: sv[1])
        last_step, last = val[-1]
        if last > best * (1 + tolerance):
            return (f"validation loss is rising: best {best:.4g} at step {best_step}, now {last:.4g} at step "
                    f"{last_step} — the model is overfitting; prefer the step-{best_step} weights, or add data")
        if best_step <= val[len(val) // 2][0] and best_step != last_step:
            return (f"validation loss stopped improving: best {best:.4g} at step {best_step}, flat since — "
                    "more steps are unlikely to help")
        return f"validation loss still improving (best {best:.4g} at step {best_step}) — more steps would help"
    losses = [v for _, v in _finite(rows, "loss")]
    if len(losses) < 10:
        return "too few logged steps to judge the trend"
    fifth = max(2, len(losses) // 5)
    before, end = sum(losses[-2 * fifth:-fifth]) / fifth, sum(losses[-fifth:]) / fifth
    change = (before - end) / before if before else 0.0
    if change > tolerance:
        return f"training loss still falling at the end ({change:.0%} over the last fifth of the run) — more steps would help"
    return f"training loss has flattened over the last fifth of the run ({change:+.1%})"


VAL_KEYS = {"val_loss": "validation loss (training weights)", "val_loss_ema": "validation loss (EMA weights)"}


def validation_summary(rows: list[dict]) -> list[str]:
    """report.md table rows: the lowest held-out loss and its step, and the last one, per set of weights."""
    lines = []
    for key, label in VAL_KEYS.items():
        val = _finite(rows, key)
        if val:
            best_step, best = min(val, key=lambda sv: sv[1])
            lines += [f"| {label}, lowest | {best:.5g} at step {best_step} |",
                      f"| {label}, last | {val[-1][1]:.5g} at step {val[-1][0]} |"]
    return lines


def plot_loss(rows: list[dict], out_png, title: str = "training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = {key: _finite(rows, key) for key in VAL_KEYS}
    rows = [r for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    if losses:
        ax.plot(steps, smooth(losses, max(1, len(losses) // 20)), label="moving average")
    for (key, label), style in zip(VAL_KEYS.items(), ("o-", "s--")):
        if val[key]:
            ax.plot(*zip(*val[key]), style, markersize=4, label=label)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    io.save_figure(fig, out_png)
    plt.close(fig)


def write_report(run_dir, title: str, facts: dict, metric: str = "loss") -> Path:
    """report.md (facts + loss numbers) and loss.png from metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(rows, run_dir / "loss.png", title=f"{title}: {metric}")
    first, last, drop = loss_drop(rows)
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [f"| {metric}, first (smoothed) | {first:.5g} |", f"| {metric}, last (smoothed) | {last:.5g} |",
              f"| {metric} drop | {drop:.1%} |", *validation_summary(rows), "", f"**Verdict:** {progress_verdict(rows)}", "",
              "![loss](loss.png)", ""]
    path = run_dir / "report.md"
    io.write_text(path, "\n".join(lines))
    return path
