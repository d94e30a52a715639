"""TRL's `DPOTrainer` on bench/run.py's section (g) workload: the same pairs, model directory, micro
batch, steps, lr, beta and precision as trainrig's `launch/dpo.py`.

    python bench/trl_dpo.py --run '<json list of trl_dpo arguments>'   # one measurement, one JSON line

What is pinned (DPOConfig): fp32, SDPA, `activation_checkpointing=False`, AdamW betas 0.9/0.95,
eps 1e-8, weight decay 0, constant lr without warmup, clip 1.0, the seed, `max_length` = the
bench's max_seq_length (every pair fits it), loss sigmoid with the same beta, no checkpoints, no
trackers. Everything else is TRL's default, which is what a TRL user runs: a resident reference
model (a second copy of the starting model, `precompute_ref_log_probs=False`), its tokenisation of
the conversational records through the chat template, its collator and its fused LM head. TRL's
completion is the template's text after the prompt, so it also scores the "\\n" after each
answer's `<|im_end|>` (one token per side more than trainrig; the throughput compares the same
pairs, not the same tokens).

Timed as trl_sft.py times: from the end of step `warmup` to the end of step `steps`, data loading
and logging included. After the last step, `trainer.evaluate` on the held-out pairs gives the
reward accuracy (`eval_rewards/accuracies`: the share with chosen reward > rejected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def conversational(record: dict) -> dict:
    """A bench pair record ({"prompt", "chosen", "rejected"} strings) in TRL's conversational form."""
    return {"prompt": [{"role": "user", "content": record["prompt"]}],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}]}


def trl_dpo(pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, seed, beta) -> dict:
    """One DPOTrainer run; pairs_s over the timed steps, peak_rss_gb (VmHWM at the end, loading and
    the resident reference included), the held-out reward accuracy and margin, the last timed loss."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trl_sft import peak_rss_gb

    assert 0 < warmup < steps
    read = lambda path: [conversational(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]  # noqa: E731
    timing = {"start": None, "end": None}
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                timing["start"] = time.perf_counter()
            elif state.global_step == steps:
                timing["end"] = time.perf_counter()

    class LossKeepingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(float(loss))
            return loss

    with tempfile.TemporaryDirectory(prefix="trl-dpo-") as tmp:
        config = DPOConfig(
            output_dir=str(Path(tmp) / "out"), max_steps=steps, per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
            seed=seed, data_seed=seed, bf16=False, fp16=False, activation_checkpointing=False, beta=beta, loss_type=["sigmoid"],
            max_length=max_len, precompute_ref_log_probs=False, model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
            logging_steps=warmup, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = LossKeepingDPOTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(read(pairs)),
                                        eval_dataset=Dataset.from_list(read(heldout)), callbacks=[Timer()])
        trainer.train()
        seconds = timing["end"] - timing["start"]
        figures = trainer.evaluate()
    return {"trl": trl.__version__, "pairs_s": (steps - warmup) * micro / seconds, "seconds": seconds, "loss": losses[steps - 1],
            "eval_reward_accuracy": figures["eval_rewards/accuracies"], "eval_reward_margin": figures["eval_rewards/margins"],
            "peak_rss_gb": peak_rss_gb()}


def trl_dpo_in_process(*args) -> dict:
    """`trl_dpo` in its own process, like every other run of the bench."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", json.dumps([str(a) for a in args])]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the TRL DPOTrainer run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="JSON list: pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, seed, beta")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    pairs, heldout, model_dir, max_len, micro, steps, warmup, lr, seed, beta = json.loads(args.run)
    print(json.dumps(trl_dpo(Path(pairs), Path(heldout), Path(model_dir), int(max_len), int(micro), int(steps), int(warmup),
                             float(lr), int(seed), float(beta))))


if __name__ == "__main__":
    main()
