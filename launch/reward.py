"""Train a reward model on preference pairs ({"prompt", "chosen", "rejected"}), full or LoRA (--lora_r > 0).

Runs unchanged under every launcher:
    python launch/reward.py --model_name_or_path outputs/sft/final/merged --train_files data/pairs.jsonl
    torchrun --nproc_per_node 2 launch/reward.py --config ...
    deepspeed --num_gpus 4 launch/reward.py --zero_stage 2 --config ...
"""

from __future__ import annotations

import sys

from trainers.config import RewardConfig, parse_config
from trainers.errors import exit_on_usage_error


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    from launch.plan import plan_in_process
    from trainers.reward import train

    cfg = parse_config(RewardConfig, argv, prog="launch/reward.py")
    plan_in_process(cfg, "reward")  # fills `auto` batch flags; the memory estimate goes to plan.json
    return train(cfg)


if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
