"""Pretrain from scratch (--model_preset) or continue pretraining (--model_name_or_path) on packed blocks.

Runs unchanged under every launcher:
    python launch/pretrain.py --config configs/pretrain_tiny.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    accelerate launch --num_processes 2 [--use_deepspeed] launch/pretrain.py --config ...
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --config ...
"""

from __future__ import annotations

import sys

from trainers.config import PretrainConfig, parse_config
from trainers.errors import exit_on_usage_error


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    from launch.plan import plan_in_process
    from trainers.pretrain import train

    cfg = parse_config(PretrainConfig, argv, prog="launch/pretrain.py")
    plan_in_process(cfg, "cpt" if cfg.model.model_name_or_path else "pretrain")  # fills `auto` batch flags; memory goes to plan.json
    return train(cfg)


if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
