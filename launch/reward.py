"""Train a reward model on preference pairs ({"prompt", "chosen", "rejected"}), full or LoRA (--lora_r > 0).

Runs unchanged under every launcher:
    python launch/reward.py --model_name_or_path outputs/sft/final/merged --train_files data/pairs.jsonl
    torchrun --nproc_per_node 2 launch/reward.py --config ...
    deepspeed --num_gpus 4 launch/reward.py --zero_stage 2 --config ...
"""

from __future__ import annotations

import sys

from launch.plan import stage_main

main = stage_main("reward")  # trainers/reward.py's train, after the flags are parsed and the batch planned

if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
