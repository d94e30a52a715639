"""What a run reports: metrics.jsonl, an optional tracker (wandb / tensorboard), loss.png.

Only the main rank writes. Tracker configs pass through `redact`, so no secret leaves the process.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from trainers.config import redact, to_flat_dict
from trainers.errors import UsageError

log = logging.getLogger("trainrig.tracking")

METRICS_FILE = "metrics.jsonl"


class Tracker:
    def __init__(self, output_dir: Path, report_to: str, run_name: str, cfg, enabled: bool, resumed_step: int):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self.backend = None
        self.report_to = report_to
        if not enabled:
            return
        if resumed_step == 0:
            self.path.unlink(missing_ok=True)
        else:  # drop lines past the checkpoint, so a resumed run's metrics read as one run
            self._truncate_after(resumed_step)
        config = redact(to_flat_dict(cfg))
        if report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise UsageError("--report_to wandb: wandb is not installed; `pip install wandb` or --report_to none") from None
            # WANDB_MODE=offline works without a network; the key comes only from wandb's own login/env
            try:
                # the run name is redacted like the config (a name built from the environment may carry a
                # token), and so is the command line wandb records in the run's metadata
                argv, sys.argv = sys.argv, redact(list(sys.argv))
                try:
                    self.backend = wandb.init(project="trainrig", name=redact(run_name or output_dir.name), dir=str(output_dir),
                                              config=config, resume="allow")
                finally:
                    sys.argv = argv
            except Exception as err:  # wandb raises its own types for login and network problems
                raise UsageError(f"--report_to wandb: wandb could not start ({str(err).splitlines()[0][:200]}); run "
                                 f"`wandb login`, set WANDB_MODE=offline, or use --report_to tensorboard") from None
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            self.backend.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def _truncate_after(self, step: int) -> None:
        """Keep lines up to `step`; a line torn by a kill mid-write is dropped."""
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.report_to == "wandb":
            self.backend.log(numbers, step=step)
        elif self.report_to == "tensorboard":
            for key, value in numbers.items():
                self.backend.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled and self.backend is not None:
            (self.backend.finish if self.report_to == "wandb" else self.backend.close)()


def read_metrics(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run
                continue
    return records


def plot_loss(metrics_path: Path, out_png: Path, title: str = "") -> None:
    """loss (and eval loss) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or metrics_path.parent.name)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    rewards = [(name, [(r["step"], r[key]) for r in records if r.get(key) is not None])
               for name, key in (("train reward accuracy", "rewards/accuracy"), ("eval reward accuracy", "eval_rewards/accuracy"),
                                 ("train reward margin", "rewards/margin"), ("eval reward margin", "eval_rewards/margin"))]
    if any(points for _, points in rewards):  # preference optimisation: its implicit rewards on a second axis
        right = ax.twinx()
        for (name, points), style in zip(rewards, ("--", "s--", ":", "^:")):
            if points:
                right.plot(*zip(*points), style, label=name, lw=1.0, ms=3, color="tab:green" if "accuracy" in name else "tab:red")
        right.set_ylabel("reward accuracy / margin")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


class StepLog:
    """A loop's reporting: every --logging_steps one record (metrics.jsonl and the tracker) and one
    line with the ETA; on a terminal also a progress bar (batch logs from sbatch or CI get only the
    lines). Rates count only time inside training steps (eval and checkpoint writes are paused
    out, so the figures compare across runs) over the last logging window."""

    def __init__(self, runtime, tracker: Tracker, total_steps: int, start_step: int, logging_steps: int,
                 desc: str, counts_at_start: dict[str, int]):
        import sys

        from tqdm.auto import tqdm

        self.runtime, self.tracker = runtime, tracker
        self.total_steps, self.start_step, self.logging_steps = total_steps, start_step, logging_steps
        self.progress = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, mininterval=1.0,
                             disable=not (runtime.is_main and sys.stdout.isatty()), file=sys.stdout)
        self.started = time.perf_counter()
        self.train_seconds = self._window_seconds = 0.0
        self._since = 0.0
        self._losses: list[float] = []
        self._counts = dict(counts_at_start)
        self.last: dict = {}

    def step_started(self) -> None:
        self._since = time.perf_counter()

    def step_finished(self, loss: float, applied: bool = True) -> None:
        """A skipped update's loss (NaN/Inf) stays out of the window mean; fit.account_step
        writes its own record."""
        spent = time.perf_counter() - self._since
        self.train_seconds += spent
        self._window_seconds += spent
        if applied and math.isfinite(loss):
            self._losses.append(loss)
        self.progress.update(1)

    def due(self, step: int) -> bool:
        return step % self.logging_steps == 0 or step == self.total_steps

    def log(self, step: int, lr: float, grad_norm: float | None, counts: dict[str, int], epoch: float, skipped_steps: int = 0,
            figures: dict | None = None) -> dict:
        """Write the record for `step`; `counts` are running totals (e.g. tokens), reported with
        their rate over the window as `<name>_per_sec`. The first count is the headline rate.
        `loss` is the mean over the window's applied steps (None if every one was skipped).
        `figures`: the stage's own (DPO's rewards), in the record and the line."""
        window = max(self._window_seconds, 1e-9)
        rates = {f"{k}_per_sec": round((v - self._counts[k]) / window, 1) for k, v in counts.items()}
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        if grad_norm is not None and not math.isfinite(grad_norm):
            grad_norm = None  # JSON has no NaN/Infinity; the skip record says what happened
        self.last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     **rates, "elapsed_s": round(time.perf_counter() - self.started, 2), **counts,
                     "epoch": round(epoch, 4), "peak_memory_gb": round(self.runtime.peak_memory_gb(), 3),
                     "skipped_steps": skipped_steps, **(figures or {})}
        self._counts, self._losses, self._window_seconds = dict(counts), [], 0.0
        used = self.runtime.device_memory_used_gb()
        if used is not None:
            self.last["device_used_gb"] = round(used, 3)
        self.tracker.log(self.last)
        headline = next(iter(rates.values()))
        shown = "skipped" if loss is None else f"{loss:.4f}"
        self.progress.set_postfix(loss=shown, lr=f"{lr:.2e}", tok_s=f"{headline:,.0f}")
        if self.runtime.is_main:
            eta = (self.total_steps - step) * self.train_seconds / max(step - self.start_step, 1)
            norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
            skipped = f" skipped {skipped_steps}" if skipped_steps else ""
            own = "".join(f" {k} {v:.4g}" for k, v in (figures or {}).items())
            self.progress.write(f"step {step}/{self.total_steps} loss {shown} lr {lr:.3e} grad_norm {norm} "
                                f"tok/s {headline:,.0f} mem {self.last['peak_memory_gb']:.2f} GB eta {eta / 60:.1f} min{skipped}{own}")
        return self.last

    def close(self) -> None:
        self.progress.close()
