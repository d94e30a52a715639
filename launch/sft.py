"""SFT on chat data (messages / ShareGPT / Alpaca), full or LoRA (--lora_r > 0), assistant-only loss.

Runs unchanged under every launcher:
    python launch/sft.py --config configs/sft_lora_qwen2.5-0.5b.yaml --train_files data/chat.jsonl
    torchrun --nproc_per_node 2 launch/sft.py --config ...
    accelerate launch --num_processes 2 [--use_deepspeed] launch/sft.py --config ...
    deepspeed --num_gpus 2 launch/sft.py --deepspeed ds_configs/zero3.json --config ...
"""

from __future__ import annotations

import sys

from trainers.config import SFTConfig, parse_config
from trainers.errors import exit_on_usage_error


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    from launch.plan import plan_in_process
    from trainers.sft import train

    cfg = parse_config(SFTConfig, argv, prog="launch/sft.py")
    plan_in_process(cfg, "sft")  # fills `auto` batch flags; the memory estimate goes to plan.json
    return train(cfg)


if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
