"""Run an entry script with one fault injected, for the reliability tests only:

    TRAINRIG_FAULT='{"kind": "nan_loss", "rank": 1, "steps": [3]}' \
        torchrun --nproc_per_node 2 tests/reliability/faults.py launch/pretrain.py <flags>

The fault is installed in the rank named by "rank" (every rank when absent), then the entry script
runs as `__main__`, exactly as the launcher would have run it. Kinds:

- nan_loss {"steps": [k, ...], "accumulation": a}: the model's loss is multiplied by NaN in the
  forward passes of optimizer steps k (counted from 1 in this process; `a` micro batches a step);
  for the reward model (a sequence classifier, whose loss the trainer makes from the scores) the
  scores are.
- pause_in_forward {"call": n, "marker": path}: the n-th training forward pass (counted from 1 in
  this process) creates `path` and waits, mid-step, until `path + ".go"` exists (at most 600 s):
  a test signals or kills the process at a known step without racing it.
- kill_in_save {"step": k}: SIGKILL this rank right after it wrote its share of checkpoint-k,
  before the manifest exists.
- fail_write {"step": k, "file": name}: writing a file whose name ends with `name` into checkpoint-k fails like a full disk:
  part of the bytes land, then OSError(ENOSPC).
- signal_in_save {"signal": "SIGTERM"}: this rank receives the signal at the start of its first
  checkpoint write (a second signal while a stop checkpoint is being saved).
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys


def on_training_forward(after, setattr=setattr, before=None) -> None:
    """Hook the n-th training forward pass of every model kind the stages train (counted from 1 in
    this process, model.training only, so evaluation passes do not count): `before(n)` runs as it
    starts, `after(n, out, kind)` may change its output, kind "loss" for a causal LM (pretraining,
    SFT), "logits" for a sequence classifier (the reward model: its loss is made from the scores
    by the trainer), and for DPO, whose loss the trainer makes from log-probs, "token_logps" (the
    chunked head's) or "logits". Every way the causal LM's loss is made is wrapped: the class's own forward and
    the chunked loss's routing, which use_chunked_loss binds to the model later and which calls the
    class's forward where it does not apply; only the outermost wrapper of a call counts it.
    `setattr`: pytest's monkeypatch.setattr in a test, so the patches are undone after it."""
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from trainers import chunked_loss

    calls, depth = [0], [0]

    def hooked(original, kind):
        def forward(self, *args, **kwargs):
            counted = self.training and depth[0] == 0
            if counted:
                calls[0] += 1
                n = calls[0]
                if before is not None:
                    before(n)
            depth[0] += 1
            try:
                out = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if not counted:
                return out
            # DPO's causal LM returns token log-probs (chunked head) or logits, from which its loss is made
            return after(n, out, kind if out.get(kind) is not None else next(k for k in ("token_logps", "logits") if out.get(k) is not None))
        return forward

    setattr(Qwen2ForCausalLM, "forward", hooked(Qwen2ForCausalLM.forward, "loss"))
    setattr(Qwen2ForSequenceClassification, "forward", hooked(Qwen2ForSequenceClassification.forward, "logits"))
    setattr(chunked_loss, "_causal_lm_forward", hooked(chunked_loss._causal_lm_forward, "loss"))


def poison_loss(factor_for_call, setattr=setattr) -> None:
    """Multiply the loss by factor_for_call(n) in the n-th training forward (None leaves it): the
    causal LM's out["loss"], the sequence classifier's scores (out["logits"]), from which the
    reward model's pairwise loss is made, or DPO's log-probs. See on_training_forward."""

    def poison(call, out, kind):
        factor = factor_for_call(call)
        if factor is not None:
            out[kind] = out[kind] * factor
        return out

    on_training_forward(poison, setattr)


def pause_at_call(call: int, marker: str, setattr=setattr) -> None:
    """The `call`-th training forward creates `marker`, then waits for `marker + ".go"` (600 s at most)."""
    import time
    from pathlib import Path

    def pause(n):
        if n != call:
            return
        Path(marker).touch()
        deadline = time.monotonic() + 600
        while not Path(marker + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # a signal's Python handler runs here, mid-step

    on_training_forward(lambda n, out, kind: out, setattr, before=pause)


def install(spec: dict) -> None:
    if spec.get("rank", int(os.environ.get("RANK", "0"))) != int(os.environ.get("RANK", "0")):
        return
    kind = spec["kind"]
    if kind == "nan_loss":
        steps, accumulation = spec["steps"], spec.get("accumulation", 1)
        poison_loss(lambda call: float("nan") if (call - 1) // accumulation + 1 in steps else None)
    elif kind == "pause_in_forward":
        pause_at_call(spec["call"], spec["marker"])
    elif kind in ("kill_in_save", "signal_in_save"):
        from trainers.runtime import Runtime

        original_save, fired = Runtime.save_training_state, [False]

        def save_training_state(self, model, optimizer, directory):
            if kind == "signal_in_save" and not fired[0]:
                fired[0] = True
                os.kill(os.getpid(), getattr(signal, spec["signal"]))
            original_save(self, model, optimizer, directory)
            if kind == "kill_in_save" and directory.name == f"checkpoint-{spec['step']}.partial":
                os.kill(os.getpid(), signal.SIGKILL)

        Runtime.save_training_state = save_training_state
    elif kind == "fail_write":
        import torch

        original_torch_save = torch.save

        def save(obj, f, *args, **kwargs):
            path = str(f)
            if f"checkpoint-{spec['step']}.partial" in path and os.path.basename(path).endswith(spec["file"]):
                with open(path, "wb") as fh:
                    fh.write(b"\0" * 4096)  # what landed before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            return original_torch_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        raise SystemExit(f"faults.py: unknown fault kind {kind!r}")


# ---------------------------------------------------------------- for the tests that use it

FAULTS = os.path.abspath(__file__)


def start_with_fault(entry: list[str], fault: dict, log_path, env: dict | None = None):
    """Start `python faults.py <entry...>` with `fault` installed, from the repository root, its
    output into `log_path` (a file: a paused process never blocks on a full pipe)."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(FAULTS)))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRAINRIG_FAULT": json.dumps(fault), **(env or {})}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, FAULTS, *entry], cwd=repo, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_marker(proc, marker, log_path, timeout: float = 300) -> None:
    """Poll until the paused process has created `marker` (it is then mid-step, waiting)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while not Path(marker).exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it paused:\n{Path(log_path).read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no pause after {timeout} s:\n{Path(log_path).read_text()[-4000:]}")
        time.sleep(0.05)


if __name__ == "__main__":
    install(json.loads(os.environ["TRAINRIG_FAULT"]))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
