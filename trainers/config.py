"""Run configuration: one dataclass per concern, merged defaults < YAML (`--config`) < CLI.

Every field carries its help text in `metadata["help"]`, which is also the `--help` text.
Flags are flat and HF-named (`--per_device_train_batch_size`), so a command line written for
the classic `deepspeed pretrain.py --deepspeed ds.json --bf16 ...` scripts carries over.
Unknown flags and unknown YAML keys are errors that name the key, the file and line, and the
closest known name. Booleans are YAML booleans, `--flag` / `--no-flag` on the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainers.errors import UsageError


def opt(default: Any, help: str, choices: tuple | None = None, *, factory=None, minimum: float | None = None,
        auto: bool = False):
    """A config field: its default, its help text (shown by --help), optionally its choices, the
    smallest value it accepts, or (auto=True) the word "auto" instead of a number: the planner's
    (launch/planner/search.py) to decide before training starts."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "auto": auto}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------- concerns


@dataclass
class RunConfig:
    output_dir: str = opt("outputs/run", "Directory for checkpoints, final/, metrics.jsonl, loss.png and the resolved config.")
    seed: int = opt(42, "Seed for model init, data order and dropout; every rank derives its own streams from it.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means run --num_train_epochs epochs.")
    num_train_epochs: float = opt(1.0, "Epochs over the training blocks when --max_steps is -1 (fractions allowed).", minimum=0)
    logging_steps: int = opt(10, "Write a metrics.jsonl line (and tracker point) every N optimizer steps.", minimum=1)
    eval_steps: int = opt(0, "Evaluate loss/perplexity on the validation blocks every N steps (0: only at the end).", minimum=0)
    save_steps: int = opt(0, "Write a resumable checkpoint-<step>/ every N steps (0: no checkpoints; final/ is always written).", minimum=0)
    save_total_limit: int = opt(0, "Keep at most N checkpoints (0: keep all); older ones go only after a newer one is complete.", minimum=0)
    save_best: bool = opt(False, "With --save_total_limit, also keep the checkpoint with the lowest eval loss (needs --eval_steps dividing --save_steps).")
    save_final: bool = opt(True, "Write final/ at the end (trainrig launch --probe's trial runs turn it off).")
    resume: str = opt("auto", "auto: newest complete checkpoint in --output_dir if any; never: start fresh; or a checkpoint path.")
    max_bad_steps: int = opt(5, "Skip an optimizer step whose loss or gradient norm is NaN/Inf (on any rank: every rank skips it); stop the run after this many such steps in a row (0: at the first).", minimum=0)
    record_sample_ids: bool = opt(False, "Every rank appends the sample ids of each optimizer step to sample_ids.rank<N>.jsonl in --output_dir (to audit data order across resumes).")
    report_to: str = opt("none", "Experiment tracker besides metrics.jsonl.", ("none", "wandb", "tensorboard"))
    run_name: str = opt("", "Name shown by the tracker (default: the output directory's name).")


@dataclass
class BatchConfig:
    per_device_train_batch_size: int | str = opt(8, "Micro batch: sequences per rank per forward/backward pass; auto: the largest that fits this GPU (launch/planner/search.py).", minimum=1, auto=True)
    gradient_accumulation_steps: int | str = opt(1, "Micro batches accumulated per optimizer step; auto: as many as reach --global_batch_size.", minimum=1, auto=True)
    global_batch_size: int = opt(0, "If > 0: sequences per optimizer step over all ranks; sets the accumulation from the micro batch and world size (must divide exactly unless the accumulation is auto).", minimum=0)
    per_device_eval_batch_size: int = opt(0, "Sequences per rank per eval pass (0: the training micro batch).", minimum=0)
    dataloader_num_workers: int = opt(0, "DataLoader worker processes per rank (blocks are memory-mapped, so 0 is usually enough).", minimum=0)


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw", "adamw (fused where available); muon: torch.optim.Muon for 2-D hidden matrices and AdamW for embeddings, head, norms and biases; adamw8bit / paged_adamw8bit: bitsandbytes' AdamW with 8-bit moments (2 B per parameter instead of 8; paged: states page to host memory under pressure on CUDA), without DeepSpeed.", ("adamw", "muon", "adamw8bit", "paged_adamw8bit"))
    learning_rate: float = opt(3e-4, "Peak learning rate. Muon scales its orthogonalised update to AdamW's RMS (Moonlight), so one rate serves both groups.", minimum=0)
    muon_momentum: float = opt(0.95, "Muon momentum.")
    weight_decay: float = opt(0.1, "Decoupled weight decay on matrices (never on norms, biases or embeddings).", minimum=0)
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.95, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = opt("cosine", "Shape after warmup.", ("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.0, "Fraction of the total steps spent warming up linearly from 0.", minimum=0)
    warmup_steps: int = opt(0, "Warmup steps; overrides --warmup_ratio when > 0.", minimum=0)
    min_lr_ratio: float = opt(0.1, "Cosine/linear decay ends at this fraction of the peak rate.", minimum=0)
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this value (0: no clipping).", minimum=0)


@dataclass
class DistributedConfig:
    precision: str = opt("auto", "auto: bf16 on GPUs that support it (TF32 matmuls on Ampere+), fp32 on CPU.", ("auto", "bf16", "fp16", "fp32"))
    deepspeed: str = opt("auto", "auto: DeepSpeed when --zero_stage or --offload asks for it; none: DDP/single process; or a DS JSON path whose \"auto\" fields are filled from this config.")
    zero_stage: str = opt("auto", "ZeRO stage 0-3 (DeepSpeed); auto: none unless a DS JSON is given.", ("auto", "0", "1", "2", "3"))
    offload: str = opt("auto", "ZeRO offload to CPU RAM: optimizer states, or all (optimizer + parameters, stage 3).", ("auto", "none", "optimizer", "all"))
    hardware: str = opt("auto", "What the planner plans for: auto (detect), or a profile: rtx5090, 4x4090, cpu, <N>xcpu, <N>x<gpu>[x<nodes>] (gpu: a100-40g a100-80g h100 h200 l40s 3090 4090 5090).")
    ddp_timeout: int = opt(1800, "Seconds a collective may wait before the run fails (rank 0 building the data cache counts).", minimum=1)
    hang_timeout: int = opt(300, "With several ranks: a rank that has not been heard from for this many seconds (stopped, hung in native code, its machine gone) makes the others stop the run, naming it (0: off; --ddp_timeout still applies).", minimum=0)


@dataclass
class ModelConfig:
    model_name_or_path: str = opt("", "The model to start from: a local HF directory (e.g. <output_dir>/final), or a hub id when online.")
    tokenizer_name_or_path: str = opt("", "Tokenizer directory (default: the model directory).")
    attn_implementation: str = opt("auto", "auto: flash_attention_2 when flash-attn imports and the GPU supports it, else sdpa.", ("auto", "flash_attention_2", "sdpa", "eager"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% more compute).")
    torch_compile: bool = opt(False, "torch.compile each decoder layer in place (regional compilation: one graph shared by all layers, "
                                      "built on the first step and cached by inductor); fuses the element-wise ops around the matmuls. "
                                      "Needs a C++ compiler on CPU, triton on a GPU.")
    trust_remote_code: bool = opt(False, "Allow a model/tokenizer directory's own Python code (auto_map) to run. Off by default.")


@dataclass
class LanguageModelConfig(ModelConfig):
    chunked_loss: bool = opt(True, "Compute the output head and its cross-entropy a chunk of tokens at a time (trainers/chunked_loss.py): "
                                   "the tokens x vocab logits are never whole (12 bytes per vocab entry per token saved) and the step is faster; "
                                   "--no-chunked_loss uses the model's own loss.")


@dataclass
class PretrainModelConfig(LanguageModelConfig):
    model_preset: str = opt("", "From-scratch Qwen2 shape from configs/models/ (tiny, small, 125m, 0.5b, 1.5b); vocab comes from the tokenizer. "
                                "Without it, --model_name_or_path is continued pretraining.")


@dataclass
class PretrainDataConfig:
    train_files: list[str] = opt(None, "Training text: .txt, .jsonl/.json (a text field), .parquet, or a `datasets` directory; several allowed.", factory=list)
    validation_files: list[str] = opt(None, "Validation text in the same formats (default: --validation_split_ratio of the training blocks).", factory=list)
    validation_split_ratio: float = opt(0.01, "Without --validation_files, hold out this fraction of the training blocks (at least 1 block when there are 2+).", minimum=0)
    text_field: str = opt("text", "Field holding the document text in jsonl/parquet/datasets input.")
    block_size: int = opt(1024, "Tokens per training block (documents are joined with EOS and cut into blocks).", minimum=2)
    data_cache_dir: str = opt("", "Directory for the tokenized-block caches (default: $TRAINRIG_CACHE/blocks, $TRAINRIG_CACHE defaulting to ~/.cache/trainrig).")
    tokenize_batch_size: int = opt(1000, "Documents per tokenizer call (the Rust tokenizer spreads each call over all cores).", minimum=1)


@dataclass
class LoraConfig:
    lora_r: int = opt(0, "LoRA rank; 0 trains every weight (full fine-tuning).", minimum=0)
    lora_alpha: float = opt(32.0, "LoRA scaling numerator: updates are scaled by alpha / r.", minimum=0)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", minimum=0)
    lora_target_modules: list[str] = opt(None, "Module names to adapt; all-linear: every linear layer of attention and MLP (not the output head).", factory=lambda: ["all-linear"])
    merge_lora: bool = opt(False, "Also write final/merged/: the base model with the adapter merged in (loads without PEFT).")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4 bits (bitsandbytes: 0.5 B per weight, ~3.7x less than bf16; 14B fits a 24-32 GB card). Needs --lora_r > 0 and an existing model; one process, DDP or ZeRO-1/2 (not ZeRO-3, no offload).")
    load_in_8bit: bool = opt(False, "Load the frozen base in 8 bits (bitsandbytes LLM.int8: 1 B per weight). Needs --lora_r > 0; one process, DDP or ZeRO-1/2 (not ZeRO-3, no offload).")
    bnb_4bit_quant_type: str = opt("nf4", "With --load_in_4bit: the 4-bit data type, nf4 (QLoRA's normal float, for normally distributed weights) or fp4.", ("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = opt(True, "With --load_in_4bit: quantize the blocks' scales too (8-bit instead of fp32: 0.127 instead of 0.5 bits per weight).")
    use_dora: bool = opt(False, "DoRA (PEFT): each adapted weight is split into a trained magnitude per output row and a direction the LoRA update moves; "
                                "closer to full fine-tuning at low ranks. Costs 2 activations per adapted output per token, the weight norms each step, "
                                "and with --lora_dropout > 0 a second base matmul whose dequantized weight is kept for the backward, so --lora_dropout defaults to 0 with it. "
                                "On a 16-bit or 4-bit base (not 8-bit).")
    use_rslora: bool = opt(False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so higher ranks keep learning (PEFT use_rslora).")
    quantization: str = opt("none", "auto: the planner keeps the base in 16 bits where every GPU holds it whole (one process, DDP, ZeRO-1/2) and loads it "
                                    "in 4 bits (QLoRA) where 16 would be sharded by ZeRO-3, offloaded or not fit "
                                    "(needs --lora_r; not with --load_in_4bit/--load_in_8bit, which decide it themselves); none: as those flags say.",
                            ("none", "auto"))


@dataclass
class ChatLoraConfig(LoraConfig):
    lora_train_chat_tokens: bool = opt(True, "With LoRA, also train the embedding rows of the chat template's turn tokens, <|im_start|> and <|im_end|> in ChatML (PEFT trainable_token_indices): base models often never saw them (Qwen2.5 and Llama-3 bases ship them untrained), and frozen they keep the model from learning where a turn ends.")


@dataclass
class PretrainConfig:
    """Everything `launch/pretrain.py` takes. Each section is one concern."""

    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # continued pretraining only (--model_name_or_path)


@dataclass
class SFTDataConfig:
    train_files: list[str] = opt(None, "Chat data: .jsonl/.json, .parquet or a `datasets` directory, in messages (OpenAI), ShareGPT or Alpaca form; several allowed, mixed.", factory=list)
    validation_files: list[str] = opt(None, "Validation chat data in the same forms (default: --validation_split_ratio of the training samples).", factory=list)
    validation_split_ratio: float = opt(0.01, "Without --validation_files, hold out this fraction of the training samples (at least 1 when there are 2+).", minimum=0)
    chat_format: str = opt("auto", "Record layout; auto decides per file from its first record.", ("auto", "messages", "sharegpt", "alpaca"))
    max_seq_length: int = opt(2048, "Longest sample in tokens (and the packed row length); longer samples are cut after a whole assistant turn, or dropped if none fits.", minimum=8)
    packing: bool = opt(True, "Pack samples into --max_seq_length rows, padding-free (position_ids restart per sample); --no-packing pads length-grouped batches.")
    train_on: str = opt("all_assistant", "Which assistant turns carry loss: every one, or only the last of each conversation.", ("all_assistant", "last_assistant"))
    default_system_prompt: str = opt("", "System prompt for conversations without one (default: the one the tokenizer's chat template adds, if any).")
    train_on_reasoning: str = opt("all", "Reasoning blocks (<think>...</think>, or reasoning_content) that the chat template renders: train them all, only the last assistant turn's, or none (the answer after them is trained). Reasoning the template drops (Qwen3: before the last user turn) is never trained.", ("all", "last", "none"))
    enable_thinking: str = opt("template", "Passed to the chat template as enable_thinking where it reads it (Qwen3): true, false (the generation prompt then writes an empty <think> block, which is not trained), or template: its own default.", ("template", "true", "false"))
    strict: bool = opt(False, "Stop at the first bad sample (exit 2) instead of skipping and counting it.")
    data_cache_dir: str = opt("", "Directory for the encoded-sample caches (default: $TRAINRIG_CACHE/chat, $TRAINRIG_CACHE defaulting to ~/.cache/trainrig).")


@dataclass
class SFTConfig:
    """Everything `launch/sft.py` takes. SFT defaults: learning rate 2e-5 for full fine-tuning
    (2e-4 with LoRA unless --learning_rate is given), 3% warmup, no weight decay."""

    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=2e-5, warmup_ratio=0.03, weight_decay=0.0))
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: ChatLoraConfig = field(default_factory=ChatLoraConfig)


@dataclass
class RewardDataConfig:
    train_files: list[str] = opt(None, "Preference pairs: records with prompt (or question, or a messages list), chosen and rejected; .jsonl/.json, .parquet or a `datasets` directory.", factory=list)
    validation_files: list[str] = opt(None, "Validation pairs in the same forms (default: --validation_split_ratio of the training pairs).", factory=list)
    validation_split_ratio: float = opt(0.05, "Without --validation_files, hold out this fraction of the training pairs for pair accuracy.", minimum=0)
    max_seq_length: int = opt(2048, "Longest conversation in tokens; a pair whose longer side exceeds it is dropped and counted.", minimum=8)


@dataclass
class RewardConfig:
    """Everything `launch/reward.py` takes. Defaults: learning rate 1e-5 for full training (1e-4
    with LoRA unless --learning_rate is given), 3% warmup, no weight decay."""

    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=1e-5, warmup_ratio=0.03, weight_decay=0.0))
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PreferenceDataConfig:
    train_files: list[str] = opt(None, "Preference pairs: records with prompt (or question, or a messages list of earlier turns), chosen and rejected (strings, or TRL's conversational lists); .jsonl/.json, .parquet or a `datasets` directory.", factory=list)
    validation_files: list[str] = opt(None, "Validation pairs in the same forms (default: --validation_split_ratio of the training pairs).", factory=list)
    validation_split_ratio: float = opt(0.05, "Without --validation_files, hold out this fraction of the training pairs for the reward accuracy.", minimum=0)
    max_seq_length: int = opt(2048, "Longest side of a pair in tokens. A longer pair loses its earliest context turns (whole user/assistant turns, the system prompt and the last user turn kept); one that still does not fit is dropped, counted with its place.", minimum=8)
    default_system_prompt: str = opt("", "System prompt for pairs without one (default: the one the tokenizer's chat template adds, if any).")
    data_cache_dir: str = opt("", "Directory for the reference log-prob caches (default: $TRAINRIG_CACHE/reference, $TRAINRIG_CACHE defaulting to ~/.cache/trainrig).")


@dataclass
class PreferenceLossConfig:
    loss_type: str = opt("sigmoid", "sigmoid: DPO; ipo: IPO's squared loss on the per-token log-ratio margin; hinge: SLiC's hinge; simpo: SimPO, reference-free, "
                                     "length-normalised log-probs with a target margin --simpo_gamma; orpo: ORPO, reference-free, the chosen answer's NLL plus --beta x the odds-ratio term.",
                         ("sigmoid", "ipo", "hinge", "simpo", "orpo"))
    beta: float = opt(0.1, "DPO/hinge/SimPO: the inverse temperature on the log-ratio margin (SimPO's paper uses 2-2.5); IPO: the regularisation tau (target margin 1/(2 tau)); ORPO: the weight lambda of the odds-ratio term.", minimum=0)
    label_smoothing: float = opt(0.0, "sigmoid and simpo: the assumed share of pairs whose preference is flipped (conservative DPO); 0 elsewhere.", minimum=0)
    simpo_gamma: float = opt(0.5, "SimPO: the target margin gamma between the chosen and rejected answers' average log-probs, times beta.", minimum=0)
    reference: str = opt("precomputed", "Where the reference log-probs of the DPO-family losses come from. precomputed: one pass of the starting model over the "
                                        "pairs before training (shared over ranks, cached on disk), so no reference model is held and each step runs the policy alone; "
                                        "adapter_disabled (LoRA only): the policy with its adapter switched off, each step (one more forward per step, nothing cached). "
                                        "Unused by simpo and orpo.", ("precomputed", "adapter_disabled"))


@dataclass
class DPOConfig:
    """Everything `launch/dpo.py` takes. Defaults: learning rate 5e-7 for full training (5e-6 with
    LoRA unless --learning_rate is given), 10% warmup, no weight decay, DPO's beta 0.1."""

    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=5e-7, warmup_ratio=0.1, weight_decay=0.0))
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    preference: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EvalRunConfig:
    output_dir: str = opt("outputs/eval", "Directory for report.json and predictions.jsonl.")
    precision: str = opt("auto", "auto: bf16 on GPUs that support it, fp32 on CPU.", ("auto", "bf16", "fp16", "fp32"))
    ddp_timeout: int = opt(1800, "Seconds a collective may wait under a launcher with several ranks.", minimum=1)


@dataclass
class EvalModelConfig:
    model_name_or_path: str = opt("", "The model to evaluate: a local HF directory (e.g. <output_dir>/final or final/merged), or a hub id when online.")
    adapter_path: str = opt("", "A LoRA adapter directory (an SFT run's final/ with --lora_r) applied on --model_name_or_path.")
    tokenizer_name_or_path: str = opt("", "Tokenizer directory (default: the adapter's when it has one, else the model's).")
    attn_implementation: str = opt("auto", "auto: flash_attention_2 when flash-attn imports and the GPU supports it, else sdpa.", ("auto", "flash_attention_2", "sdpa", "eager"))
    trust_remote_code: bool = opt(False, "Allow a model/tokenizer directory's own Python code (auto_map) to run. Off by default.")


@dataclass
class EvalDataConfig:
    eval_files: list[str] = opt(None, "Evaluation sets, each scored on its own: questions (chat records, whose last assistant turn is the reference, or QA records question/answer(s), prompt/response) by EM/F1; text (.txt, or records with --text_field) by perplexity.", factory=list)
    chat_format: str = opt("auto", "Record layout of the question files; auto decides per record (qa: question/answer or prompt/response fields).", ("auto", "messages", "sharegpt", "alpaca", "qa"))
    max_new_tokens: int = opt(64, "Longest generated answer in tokens (reasoning included); generation stops earlier at the token ending a turn (<|im_end|>) or EOS.", minimum=1)
    enable_thinking: str = opt("template", "Passed to the chat template as enable_thinking where it reads it (Qwen3): true, false (the generation prompt then writes an empty <think> block), or template: its own default.", ("template", "true", "false"))
    batch_size: int = opt(16, "Prompts per generation batch (left-padded), or blocks per perplexity batch, per rank.", minimum=1)
    max_samples: int = opt(0, "Evaluate only the first N questions of each file (0: all).", minimum=0)
    text_field: str = opt("text", "Field holding the document text in jsonl/parquet text files.")
    block_size: int = opt(1024, "Tokens per perplexity block (documents joined with EOS and cut into blocks).", minimum=2)
    data_cache_dir: str = opt("", "Directory for the tokenized-block caches of text files (default: $TRAINRIG_CACHE/blocks).")


@dataclass
class EvaluateConfig:
    """Everything `launch/evaluate.py` takes."""

    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)


@dataclass
class GenerateArgs:
    prompt: str = opt("", "The user message to answer; without it, an interactive chat on the terminal (an empty line or Ctrl-D ends it).")
    system_prompt: str = opt("", "A system message before the conversation (default: none, or the one the chat template adds).")
    max_new_tokens: int = opt(256, "Longest answer in tokens (reasoning included); generation stops earlier at the token ending a turn (<|im_end|>) or EOS.", minimum=1)
    enable_thinking: str = opt("template", "Passed to the chat template as enable_thinking where it reads it (Qwen3): true, false (the generation prompt then writes an empty <think> block), or template: its own default.", ("template", "true", "false"))
    temperature: float = opt(0.0, "0: greedy (the answer evaluation scores); above 0: sampling at this temperature.", minimum=0)
    top_p: float = opt(1.0, "Nucleus sampling: sample from the smallest token set with this much probability (with --temperature > 0).", minimum=0)
    seed: int = opt(0, "Seed for sampling.")
    precision: str = opt("auto", "auto: bf16 on GPUs that support it, fp32 on CPU.", ("auto", "bf16", "fp16", "fp32"))


@dataclass
class GenerateConfig:
    """Everything `trainrig generate` takes."""

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    generate: GenerateArgs = field(default_factory=GenerateArgs)


# ------------------------------------------------------------------------------ flat view


def _sections(cfg_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cfg_cls)]


@dataclass(frozen=True)
class _Leaf:
    section: str
    field: dataclasses.Field
    annotation: Any  # resolved type hint, for coercion


def _leaf_fields(cfg_cls) -> dict[str, _Leaf]:
    """Flat flag name -> its section and field. Flag names are unique across sections."""
    leaves: dict[str, _Leaf] = {}
    hints = typing.get_type_hints(cfg_cls)
    for section in _sections(cfg_cls):
        section_hints = typing.get_type_hints(hints[section.name])
        for f in dataclasses.fields(hints[section.name]):
            assert f.name not in leaves, f"flag --{f.name} defined twice"
            leaves[f.name] = _Leaf(section.name, f, section_hints[f.name])
    return leaves


def to_flat_dict(cfg) -> dict[str, Any]:
    """`{flag: value}` for every field, in declaration order (what resolved_config.yaml holds)."""
    flat: dict[str, Any] = {}
    for section in _sections(type(cfg)):
        flat.update(dataclasses.asdict(getattr(cfg, section.name)))
    return flat


# ----------------------------------------------------------------------------- coercion


def _base_type(annotation):
    """(origin type, is_list) for the small set of annotations configs use."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        return str, True
    if origin in (typing.Union, types.UnionType):  # Optional[X], or int | str for a number-or-"auto" field
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation, False


def _coerce(name: str, leaf: _Leaf, value: Any, where: str) -> Any:
    if leaf.field.metadata.get("auto") and value == "auto":
        return "auto"
    value = _coerce_type(name, leaf, value, where)
    minimum = leaf.field.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise UsageError(f"{where}: {name} must be at least {minimum}, got {value}")
    return value


def _coerce_type(name: str, leaf: _Leaf, value: Any, where: str) -> Any:
    typ, is_list = _base_type(leaf.annotation)
    if value is None:  # a YAML key left blank
        if is_list:
            return []
        if typ is str:
            return ""
        raise UsageError(f"{where}: {name} is empty; give it a value or remove the key")
    if is_list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise UsageError(f"{where}: {name} must be a list of strings, got {value!r}")
        return [str(v) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"{where}: {name} must be a boolean (true/false), got {value!r}")
    if typ is int:
        kind = "an integer or auto" if leaf.field.metadata.get("auto") else "an integer"
        if isinstance(value, bool):
            raise UsageError(f"{where}: {name} must be {kind}, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {name} must be {kind}, got {value!r}") from None
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {name} must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"{where}: {name} must be a string, got {value!r}")
        value = str(value)
        choices = leaf.field.metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} for {name}")


# ------------------------------------------------------------------------------- parsing


def _yaml_with_lines(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Load a flat YAML mapping and remember each key's line (1-based) for error messages."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file; pass the path of a YAML run recipe (see configs/)")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise UsageError(f"{path}: a run recipe is a flat mapping of flag: value; got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return data, lines


def _suggest(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit 2 with usage text; we want one clear line
        raise UsageError(f"{self.prog}: {message}; see --help")


# Classic command lines (`--bf16`, `--fp16`, `--local_rank=N` from the deepspeed launcher) carry over.
_PRECISION_ALIASES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def build_arg_parser(cfg_cls, prog: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     description=(cfg_cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML run recipe (flat flag: value mapping); CLI flags win.")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for alias in _PRECISION_ALIASES:
        parser.add_argument(f"--{alias}", action="store_true", help=f"Same as --precision {alias}.")
    for name, leaf in _leaf_fields(cfg_cls).items():
        typ, is_list = _base_type(leaf.annotation)
        help_text, choices = leaf.field.metadata["help"].replace("%", "%%"), leaf.field.metadata.get("choices")  # argparse formats help with %
        if typ is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            parser.add_argument(f"--{name}", nargs="+", help=help_text)
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else typ.__name__.upper()
            parser.add_argument(f"--{name}", help=help_text, metavar=metavar)
    return parser


@dataclass
class Run:
    """A training run as resolved before it starts, handed to the stage's train(run)."""

    cfg: Any  # the stage's config (PretrainConfig, SFTConfig, ...); the planner fills its `auto` batch fields
    sources: dict[str, str]  # where each value not left at its default came from: "--flag" or "file.yaml:line"
    plan: dict | None = None  # the planner's plan for this rank's hardware (its memory estimate goes to plan.json)

    def given(self, name: str) -> bool:
        """Whether the user set `name` (a flag or YAML key) rather than leaving its default."""
        return name in self.sources


def parse_config(cfg_cls, argv: list[str] | None, prog: str):
    """defaults < YAML (--config) < CLI; every value type-checked; unknown names are errors."""
    return parse_run(cfg_cls, argv, prog).cfg


def parse_run(cfg_cls, argv: list[str] | None, prog: str) -> Run:
    """parse_config's config, with where each value came from."""
    leaves = _leaf_fields(cfg_cls)
    parser = build_arg_parser(cfg_cls, prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        raise UsageError(f"unknown flag {flag}{_suggest(flag.lstrip('-'), leaves, '--')}; see {prog} --help")
    cli = vars(ns)
    cli.pop("local_rank", None)  # the deepspeed launcher passes it; LOCAL_RANK in the env is what counts

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path = cli.pop("config", None)
    if config_path:
        data, lines = _yaml_with_lines(Path(config_path))
        for key, value in data.items():
            where = f"{config_path}:{lines.get(key, 1)}"
            if key in _PRECISION_ALIASES and value is True:
                key, value = "precision", _PRECISION_ALIASES[key]
            if key not in leaves:
                raise UsageError(f"{where}: unknown key '{key}'{_suggest(key, leaves)}; remove it or fix the name")
            merged[key] = _coerce(key, leaves[key], value, where)
            sources[key] = where
    for alias, precision in _PRECISION_ALIASES.items():
        if cli.pop(alias, False):
            cli["precision"] = precision
    for key, value in cli.items():
        merged[key] = _coerce(key, leaves[key], value, f"--{key}")
        sources[key] = f"--{key}"

    sections = {s.name: {} for s in _sections(cfg_cls)}
    for key, value in merged.items():
        sections[leaves[key].section][key] = value
    defaults = cfg_cls()  # a section's defaults may differ per stage (SFT's learning rate)
    cfg = cfg_cls(**{name: dataclasses.replace(getattr(defaults, name), **values) for name, values in sections.items()})
    return Run(cfg, sources)


# ------------------------------------------------------------------------------ secrets

# a key is secret when one of its words is: hf_token, api_key, WANDB_API_KEY -- not tokenizer_name_or_path
_SECRET_WORDS = {"token", "tokens", "secret", "password", "passwd", "credential", "credentials", "apikey"}
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
REDACTED = "***redacted***"


def redact(obj: Any) -> Any:
    """Copy of `obj` with secret-looking keys and any value containing a secret from the
    environment replaced, so resolved configs, logs and tracker configs never carry one."""
    secrets = [os.environ[v] for v in SECRET_ENV_VARS if len(os.environ.get(v, "")) >= 8]
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _is_secret_key(k) and v not in (None, "", False)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj


def _is_secret_key(key: str) -> bool:
    words = re.split(r"[_\-.\s]+", key.lower())
    joined = {a + b for a, b in zip(words, words[1:])}  # api_key -> apikey, access_key -> accesskey
    return bool((set(words) | joined) & (_SECRET_WORDS | {"accesskey", "privatekey"}))


def save_resolved_config(cfg, path: Path) -> None:
    flat = redact(to_flat_dict(cfg))
    path.write_text(yaml.safe_dump(flat, sort_keys=False), encoding="utf-8")
