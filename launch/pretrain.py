"""Pretrain from scratch (--model_preset) or continue pretraining (--model_name_or_path) on packed blocks.

Runs unchanged under every launcher:
    python launch/pretrain.py --config configs/pretrain_tiny.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    accelerate launch --num_processes 2 [--use_deepspeed] launch/pretrain.py --config ...
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --config ...
"""

from __future__ import annotations

import sys

from launch.plan import stage_main

main = stage_main("pretrain")  # trainers/pretrain.py's train, after the flags are parsed and the batch planned

if __name__ == "__main__":
    from trainers.stopping import run_as_process

    sys.exit(run_as_process(main, sys.argv[1:]))
