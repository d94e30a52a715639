"""Preference optimisation of an SFT model on pairs ({"prompt", "chosen", "rejected"}): DPO
(--loss_type sigmoid), IPO, hinge, SimPO or ORPO; full or LoRA (--lora_r > 0), QLoRA with --load_in_4bit.

Runs unchanged under every launcher:
    python launch/dpo.py --model_name_or_path outputs/sft/final/merged --train_files data/pairs.jsonl
    torchrun --nproc_per_node 2 launch/dpo.py --config ...
    deepspeed --num_gpus 4 launch/dpo.py --zero_stage 2 --config ...
"""

from __future__ import annotations

import sys

from launch.plan import stage_main

main = stage_main("dpo")  # trainers/dpo.py's train, after the flags are parsed and the batch planned

if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
