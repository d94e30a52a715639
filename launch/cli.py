"""`trainrig` — the command-line front door.

    trainrig demo [--output_dir D] [--max_steps N]     the embedded end-to-end demo (make demo)
    trainrig tokenizer ...                             = python tokenizer/train.py ...
    trainrig pretrain ...                              = python launch/pretrain.py ... (single process)
    trainrig sft ...                                   = python launch/sft.py ... (single process)
    trainrig inspect {pretrain,sft,reward} [--num_samples N] [--output F.jsonl] [stage flags]
                                                       the training data with trained tokens marked, and its statistics
    trainrig plan --stage {pretrain,cpt,sft,reward} [--hardware H] [stage flags]
                                                       strategy, micro batch, accumulation and memory per GPU; writes
                                                       plan.json, ds_config.json, accelerate.yaml and the launch command
    trainrig launch {pretrain,cpt,sft,reward} [--probe] [--hardware H] [stage flags]
                                                       plan for this machine, then run the launch command
                                                       (--probe: first confirm the micro batch with 2 real steps)
    trainrig doctor [--output_dir D] [--json]          torch/CUDA build vs GPU, flash-attn, DeepSpeed ops, NCCL P2P, RAM, disk
    trainrig evaluate --model_name_or_path M [--adapter_path A] --eval_files F ...
                                                       = python launch/evaluate.py: EM/F1 of greedy answers, perplexity on text
    trainrig generate --model_name_or_path M [--adapter_path A] [--prompt P]
                                                       answer one prompt, or chat on the terminal, streaming the tokens
    trainrig reward ...                                = python launch/reward.py ... (single process)
    trainrig pipeline --config pipeline.yaml           per dataset: SFT from the same base, evaluate; one summary.json
"""

from __future__ import annotations

import logging
import sys

from trainers.config import parse_config
from trainers.errors import exit_on_usage_error

USAGE = __doc__.split("\n\n", 1)[1]


@exit_on_usage_error
def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from launch.demo import DemoConfig, run_demo

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        run_demo(parse_config(DemoConfig, rest, prog="trainrig demo").demo)
        return 0
    if command == "tokenizer":
        from tokenizer.train import main as tokenizer_main

        tokenizer_main(rest)
        return 0
    if command == "pretrain":
        from launch.pretrain import main as pretrain_main
        from trainers.stopping import run_as_process

        return run_as_process(pretrain_main, rest)
    if command == "sft":
        from launch.sft import main as sft_main
        from trainers.stopping import run_as_process

        return run_as_process(sft_main, rest)
    if command == "inspect":
        from launch.inspect_data import main as inspect_main

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        inspect_main(rest)
        return 0
    if command == "plan":
        from launch.plan import main_plan

        return main_plan(rest)
    if command == "launch":
        from launch.plan import main_launch

        return main_launch(rest)
    if command == "evaluate":
        from launch.evaluate import main as evaluate_main

        evaluate_main(rest)
        return 0
    if command == "generate":
        from launch.generate import main as generate_main

        generate_main(rest)
        return 0
    if command == "reward":
        from launch.reward import main as reward_main
        from trainers.stopping import run_as_process

        return run_as_process(reward_main, rest)
    if command == "pipeline":
        from launch.pipeline import main as pipeline_main

        return pipeline_main(rest)
    if command == "doctor":
        from launch.doctor import main as doctor_main

        return doctor_main(rest)
    print(f"error: unknown command {command!r}; one of: demo, tokenizer, pretrain, sft, inspect, plan, launch, doctor, evaluate, generate, reward, pipeline (see trainrig --help)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())  # as the console script does: the command's status is the process's
