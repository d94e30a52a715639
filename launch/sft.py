"""SFT on chat data (messages / ShareGPT / Alpaca), full or LoRA (--lora_r > 0), assistant-only loss.

Runs unchanged under every launcher:
    python launch/sft.py --config configs/sft_lora_qwen2.5-0.5b.yaml --train_files data/chat.jsonl
    torchrun --nproc_per_node 2 launch/sft.py --config ...
    accelerate launch --num_processes 2 [--use_deepspeed] launch/sft.py --config ...
    deepspeed --num_gpus 2 launch/sft.py --deepspeed ds_configs/zero3.json --config ...
"""

from __future__ import annotations

import sys

from launch.plan import stage_main

main = stage_main("sft")  # trainers/sft.py's train, after the flags are parsed and the batch planned

if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
