"""TRL's `SFTTrainer` on bench/run.py's section (c) workload: the same chat file, model directory,
micro batch, steps, optimizer and lr as trainrig's `launch/sft.py` and the pad-to-max loop.

    python bench/trl_sft.py --run '<json list of trl_sft arguments>'   # one measurement, one JSON line

Needs TRL (`pip install -e ".[dev]"`); `trl_sft` raises `TRLUnavailable` without it.

What is pinned, in every variant (SFTConfig): fp32 (`bf16=False`; TRL's default is bf16 autocast),
SDPA attention, `activation_checkpointing=False` (transformers 5's name for gradient_checkpointing,
which TRL turns on by default, ~20-30% slower; trainrig's planner and the bare loop do not checkpoint
a model this small), AdamW betas 0.9/0.95, eps 1e-8, weight decay 0 (Trainer's default
`adamw_torch_fused`), constant lr without warmup, clip 1.0, the seed, `max_length` = the bench's
max_seq_length (every record fits it, so nothing is truncated), no eval, no checkpoints, no
trackers, the Trainer's log every `warmup` steps (as trainrig logs here; each step's loss is taken
from `training_step`'s return, so no per-step log is needed). Everything else is TRL's default: the
dataloader (shuffled, 0 workers), its tokenisation through the chat template, its collator, its
fused LM head (the vocabulary projection only at positions that have a label), its per-step
entropy / token-accuracy metrics, and the device the Trainer picks (as launch/sft.py does).

Loss mask. trainrig trains assistant tokens only: each assistant turn's content and its
`<|im_end|>`, not the "\\n" after it (HF's `{% generation %}` rule). TRL does that with
`assistant_only_loss=True`, which needs `{% generation %}` markers in the chat template; the bench
model's ChatML template has none and is not one TRL knows how to patch, so with TRL's stock
settings it would train every token (user turns and headers too). So every variant except
"all_tokens" passes `chat_template_path`, a .jinja with the very same ChatML plus the markers
around content + `<|im_end|>` (checked here to render byte-identical text on the whole set), and
`assistant_only_loss=True`: the labels are then exactly trainrig's (`dataset_trained_tokens` in the
result lets the caller check), the loss is over the same tokens, and TRL keeps the speed its fused
LM head gains from skipping unlabelled positions, which makes it the stronger baseline.

Variants:
  defaults     no packing: shuffled samples padded to the longest in each micro batch (TRL's default data path)
  packing      `packing=True` (packing_strategy "bfd", TRL's default): best-fit-decreasing rows of
               max_length, which forces padding-free: each micro batch flattened to one row, with
               `position_ids` restarting per sample and no attention mask. With SDPA, transformers
               rebuilds a block-diagonal causal mask from those position_ids (masking_utils'
               packed-sequence detection), so samples do not attend to each other (checked on the
               bench model: the logits equal each sample's alone to 4e-7); the attention is a dense
               masked one over the whole flattened micro batch (no varlen kernel on CPU). That
               detection runs only without a KV cache: TRL passes use_cache=False in training; a
               forward with the cache on would silently let the samples attend to each other.
  padding_free `padding_free=True` without packing (`max_length=None`, as TRL requires): each micro
               batch of samples flattened, no padding, but no more samples per step
  all_tokens   "defaults" with TRL's stock template and mask: loss on every token (trained tokens
               still counted as assistant tokens, so tokens/s measures the same useful work)

Counted in the timed window (the steps after `warmup`, timed by a TrainerCallback from the end of
step `warmup` to the end of the last step, data loading and logging included, as trainrig's window
is): trained tokens = assistant labels that are not -100 after the one-token shift (the same rule
as trainrig and the pad-to-max loop; in "all_tokens" the assistant positions, not TRL's labels),
non-pad = real input tokens. The loss is the mean of the last `loss_steps` timed steps' losses (each
the mean over that step's trained tokens, as in the other loops).

Equal-token runs (`token_budget`, `save_dir`): the run goes on after its timed steps until its
trained tokens since step 0 (counted as above) reach the budget, stops at that step (a
TrainerCallback), and `trainer.save_model` writes the model to save_dir for bench_sft.py's held-out
evaluator; the timed figures are those of the first `steps` steps all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("defaults", "packing", "padding_free", "all_tokens")

# The bench model's ChatML (trainers/data/chat.py's CHATML_TEMPLATE) with HF generation markers around
# each assistant turn's content and its <|im_end|>: the text it renders is the same, character for character.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TRLUnavailable(RuntimeError):
    """TRL is not installed in this environment."""


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def _import_trl():
    try:
        import trl
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        raise TRLUnavailable(f"TRL is not importable ({err}); install it with `pip install -e \".[dev]\"` "
                             "(or `pip install 'trl>=1.0'`)") from err
    return trl, SFTConfig, SFTTrainer


class AssistantCounter:
    """Assistant tokens in ChatML input_ids: after each `<|im_start|>assistant\\n` header, the content
    and its `<|im_end|>` (trainrig's trained tokens). Used where TRL's labels cover every token."""

    def __init__(self, tokenizer):
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, input_ids) -> int:
        count, h = 0, len(self.header)
        for row in input_ids.tolist():
            i = 0
            while i < len(row):
                if row[i:i + h] == self.header:
                    i += h
                    while i < len(row):
                        count += 1
                        i += 1
                        if row[i - 1] == self.im_end:
                            break
                else:
                    i += 1
        return count


def trl_sft(chat, model_dir, max_len, micro, steps, warmup, loss_steps, lr, seed, variant="defaults", token_budget=0,
            save_dir=None, lora_r=0, base_bits=16, optimizer="adamw", precision="fp32") -> dict:
    """One SFTTrainer run on the chat set; see the module docstring for the settings of each variant.
    Returns trained_tok_s, tok_s (non-pad input tokens/s), loss (mean of the last loss_steps timed steps),
    trained_tokens and non_pad_tokens (in the timed window), non_pad (the non-pad share of the input
    positions of the timed batches), rows / samples_per_row (of TRL's prepared train set) and
    dataset_trained_tokens (labels over the prepared set, after the one-token shift).
    With token_budget the run goes on after `steps` until it has trained that many tokens since
    step 0, then saves its model to save_dir (an equal-token run); steps_taken and tokens_reached
    are the whole run's.
    lora_r > 0: PEFT LoRA (alpha 32, dropout 0.05, all-linear: trainrig's defaults) passed as
    `peft_config`; base_bits 4: the base loaded through BitsAndBytesConfig (NF4, double quantization,
    compute in the run's precision), as TRL's QLoRA recipe does -- SFTTrainer then runs PEFT's
    prepare_model_for_kbit_training. optimizer adamw8bit: Trainer's `adamw_bnb_8bit`. precision bf16:
    `bf16=True` (autocast) and the base loaded in bf16. peak_rss_gb: this process's VmHWM at the end,
    the figure trainrig's metrics.jsonl reports on CPU."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    assert 0 < warmup < steps and 0 < loss_steps <= steps
    trl, SFTConfig, SFTTrainer = _import_trl()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    records = [json.loads(line) for line in Path(chat).read_text().splitlines() if line.strip()]
    conversations = [r["messages"] for r in records]
    assistant_only = variant != "all_tokens"

    with tempfile.TemporaryDirectory(prefix="trl-sft-") as tmp:
        template_path = None
        if assistant_only:
            template_path = Path(tmp) / "chatml_training.jinja"
            template_path.write_text(CHATML_TRAINING_TEMPLATE)
            stock = AutoTokenizer.from_pretrained(str(model_dir))
            for messages in conversations:  # the markers must not change a character of what is trained on
                if (stock.apply_chat_template(messages, tokenize=False)
                        != stock.apply_chat_template(messages, tokenize=False, chat_template=CHATML_TRAINING_TEMPLATE)):
                    raise RuntimeError(f"{model_dir}'s chat template does not render the ChatML that "
                                       "CHATML_TRAINING_TEMPLATE marks up; update the template in bench/trl_sft.py")

        # with a budget, a bound the run never reaches (every step trains >= 1 token); the Stop callback ends it
        max_steps = max(steps, token_budget)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model_kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
        peft_config = None
        if lora_r:
            from peft import LoraConfig

            peft_config = LoraConfig(r=lora_r, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        if base_bits == 4:
            from transformers import BitsAndBytesConfig

            model_kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
                                device_map={"": "cpu"} if not torch.cuda.is_available() else {"": 0})
        config = SFTConfig(
            output_dir=str(Path(tmp) / "out"), max_steps=max_steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_bnb_8bit" if optimizer == "adamw8bit" else "adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95,
            adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, seed=seed, data_seed=seed, bf16=precision == "bf16", fp16=False,
            activation_checkpointing=False, model_init_kwargs=model_kwargs,
            **({"use_cpu": True} if precision == "bf16" and not torch.cuda.is_available() else {}),  # Trainer's bf16 on CPU
            max_length=None if variant == "padding_free" else max_len,
            packing=variant == "packing", padding_free=variant == "padding_free",
            assistant_only_loss=assistant_only, chat_template_path=str(template_path) if template_path else None,
            logging_steps=warmup, logging_strategy="steps", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        counts = {"trained": 0, "non_pad": 0, "positions": 0, "reached": 0}  # reached: trained since step 0
        timing = {"start": None, "end": None, "steps": []}
        losses: list[float] = []  # every step's

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    timing["start"] = time.perf_counter()
                elif warmup < state.global_step <= steps:
                    timing["steps"].append(time.perf_counter() - (timing["end"] or timing["start"]))
                    timing["end"] = time.perf_counter()

        class Stop(TrainerCallback):
            """Ends the run at the first step, from the last timed one on, by which it has trained token_budget."""

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= steps and counts["reached"] >= token_budget:
                    control.should_training_stop = True

        class CountingSFTTrainer(SFTTrainer):
            """SFTTrainer that also counts each step's trained and real tokens (a few integer sums)."""

            def training_step(self, model, inputs, num_items_in_batch=None):
                ids = inputs["input_ids"]
                if assistant_only:
                    trained = int((inputs["labels"][:, 1:] != -100).sum())
                else:  # TRL trains every token here; count the assistant ones, the work the others do
                    trained = assistant_tokens(ids)
                counts["reached"] += trained
                if warmup <= self.state.global_step < steps:
                    counts["trained"] += trained
                    mask = inputs.get("attention_mask")
                    counts["non_pad"] += int(mask.sum()) if mask is not None else ids.numel()
                    counts["positions"] += ids.numel()
                loss = super().training_step(model, inputs, num_items_in_batch)
                losses.append(float(loss))  # this step's loss: the mean over its trained tokens (no accumulation)
                return loss

        assistant_tokens = AssistantCounter(AutoTokenizer.from_pretrained(str(model_dir)))
        trainer = CountingSFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(records),
                                     callbacks=[Timer(), Stop()], peft_config=peft_config)
        labels = trainer.train_dataset["labels"]
        dataset_trained = sum(sum(1 for t in row[1:] if t != -100) for row in labels)
        rows = len(trainer.train_dataset)
        trainer.train()
        if save_dir:
            trainer.save_model(str(save_dir))

    seconds = timing["end"] - timing["start"]
    tail = losses[steps - loss_steps:steps]
    return {"variant": variant, "trl": trl.__version__, "trained_tok_s": counts["trained"] / seconds,
            "tok_s": counts["non_pad"] / seconds, "loss": sum(tail) / len(tail), "trained_tokens": counts["trained"],
            "non_pad_tokens": counts["non_pad"], "non_pad": counts["non_pad"] / counts["positions"],
            "seconds": seconds, "step_seconds": [round(t, 4) for t in timing["steps"]], "rows": rows,
            "samples_per_row": len(records) / rows,
            "dataset_trained_tokens": dataset_trained, "assistant_only_loss": assistant_only,
            "steps_taken": len(losses), "tokens_reached": counts["reached"], "model": str(save_dir) if save_dir else None,
            "peak_rss_gb": peak_rss_gb()}


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM), GiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def trl_sft_in_process(*args) -> dict:
    """`trl_sft` in its own process (`python bench/trl_sft.py --run ...`), like every other run of the bench."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", json.dumps([str(a) for a in args])]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the TRL SFTTrainer run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="JSON list: chat, model_dir, max_len, micro, steps, warmup, "
                                                     "loss_steps, lr, seed, variant, token_budget, save_dir ('': none), "
                                                     "and optionally lora_r, base_bits, optimizer, precision")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    values = json.loads(args.run)
    chat, model_dir, max_len, micro, steps, warmup, loss_steps, lr, seed, variant, token_budget, save_dir = values[:12]
    lora_r, base_bits, optimizer, precision = (values[12:] + ["0", "16", "adamw", "fp32"][len(values) - 12:])[:4]
    result = trl_sft(Path(chat), Path(model_dir), int(max_len), int(micro), int(steps), int(warmup), int(loss_steps),
                     float(lr), int(seed), variant, int(token_budget), Path(save_dir) if save_dir else None,
                     int(lora_r), int(base_bits), optimizer, precision)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
