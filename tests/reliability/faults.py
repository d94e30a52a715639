"""Run an entry script with one fault injected, for the reliability tests only:

    TRAINRIG_FAULT='{"kind": "nan_loss", "rank": 1, "steps": [3]}' \
        torchrun --nproc_per_node 2 tests/reliability/faults.py launch/pretrain.py <flags>

The fault is installed in the rank named by "rank" (every rank when absent), then the entry script
runs as `__main__`, exactly as the launcher would have run it. Kinds:

- nan_loss {"steps": [k, ...], "accumulation": a}: the model's loss is multiplied by NaN in the
  forward passes of optimizer steps k (counted from 1 in this process; `a` micro batches a step).
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


def poison_loss(factor_for_call, setattr=setattr) -> None:
    """Multiply the causal LM's loss by factor_for_call(n) in its n-th training forward (counted from
    1 in this process; None leaves it). Both ways the loss is made are wrapped: the class's own forward
    and the chunked loss's routing, which use_chunked_loss binds to the model later and which calls the
    class's forward where it does not apply; only the outermost wrapper of a call counts it. `setattr`:
    pytest's monkeypatch.setattr in a test, so the patches are undone after it."""
    from transformers import Qwen2ForCausalLM

    from trainers import chunked_loss

    calls, depth = [0], [0]

    def poisoned(original):
        def forward(self, *args, **kwargs):
            depth[0] += 1
            try:
                out = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if self.training and depth[0] == 0:
                calls[0] += 1
                factor = factor_for_call(calls[0])
                if factor is not None:
                    out["loss"] = out["loss"] * factor
            return out
        return forward

    setattr(Qwen2ForCausalLM, "forward", poisoned(Qwen2ForCausalLM.forward))
    setattr(chunked_loss, "_causal_lm_forward", poisoned(chunked_loss._causal_lm_forward))


def install(spec: dict) -> None:
    if spec.get("rank", int(os.environ.get("RANK", "0"))) != int(os.environ.get("RANK", "0")):
        return
    kind = spec["kind"]
    if kind == "nan_loss":
        steps, accumulation = spec["steps"], spec.get("accumulation", 1)
        poison_loss(lambda call: float("nan") if (call - 1) // accumulation + 1 in steps else None)
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


if __name__ == "__main__":
    install(json.loads(os.environ["TRAINRIG_FAULT"]))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
