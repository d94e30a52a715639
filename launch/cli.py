"""`trainrig` — the command-line front door: one table of commands, the training stages among
them from trainers/stages.py (each `trainrig <stage>` is its entry script in a single process)."""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass

from trainers.errors import exit_on_usage_error
from trainers.stages import STAGES, plan_names


@dataclass(frozen=True)
class Command:
    usage: str  # what follows `trainrig`
    help: str
    run: object  # argv -> exit status


def _call(target: str, status_of=lambda result: 0, log_format: str | None = None):
    """A command that imports `module:function` only when it runs, calls it with argv and maps its
    result to the exit status."""
    def run(argv: list[str]) -> int:
        if log_format:
            logging.basicConfig(level=logging.INFO, format=log_format, datefmt="%H:%M:%S")
        module, function = target.split(":")
        return status_of(getattr(importlib.import_module(module), function)(argv))
    return run


def _stage(name: str):
    def run(argv: list[str]) -> int:
        from launch.plan import stage_main
        from trainers.stopping import run_as_process

        return run_as_process(stage_main(name), argv)
    return run


def _demo(argv: list[str]) -> int:
    from launch.demo import DemoConfig, run_demo
    from trainers.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run_demo(parse_config(DemoConfig, argv, prog="trainrig demo").demo)
    return 0


_stages = "{" + ",".join(STAGES) + "}"
_planned = "{" + ",".join(plan_names()) + "}"
COMMANDS: dict[str, Command] = {
    "demo": Command("demo [--output_dir D] [--max_steps N]", "the embedded end-to-end demo (make demo)", _demo),
    "tokenizer": Command("tokenizer ...", "= python tokenizer/train.py ...: a byte-level BPE tokenizer from text",
                         _call("trainers.tokenizer:main")),
    **{name: Command(f"{name} ...", f"= python {s.entry_script} ... (single process): {s.help}", _stage(name))
       for name, s in STAGES.items()},
    "inspect": Command(f"inspect {_stages} [--num_samples N] [--output F.jsonl] [stage flags]",
                       "the training data with trained tokens marked, and its statistics",
                       _call("launch.inspect_data:main", log_format="%(message)s")),
    "plan": Command(f"plan --stage {_planned} [--hardware H] [stage flags]",
                    "strategy, micro batch, accumulation and memory per GPU; writes plan.json, ds_config.json, "
                    "accelerate.yaml and the launch command", _call("launch.plan:main_plan", status_of=int)),
    "launch": Command(f"launch {_planned} [--probe] [--hardware H] [stage flags]",
                      "plan for this machine, then run the launch command (--probe: first confirm the micro batch "
                      "with 2 real steps)", _call("launch.plan:main_launch", status_of=int)),
    "doctor": Command("doctor [--output_dir D] [--json]",
                      "torch/CUDA build vs GPU, flash-attn, DeepSpeed ops, NCCL P2P, RAM, disk",
                      _call("launch.doctor:main", status_of=int)),
    "evaluate": Command("evaluate --model_name_or_path M [--adapter_path A] --eval_files F ...",
                        "= python launch/evaluate.py: EM/F1 of greedy answers, perplexity on text", _call("launch.evaluate:main")),
    "generate": Command("generate --model_name_or_path M [--adapter_path A] [--prompt P]",
                        "answer one prompt, or chat on the terminal, streaming the tokens", _call("launch.generate:main")),
    "pipeline": Command("pipeline --config pipeline.yaml", "per dataset: SFT from the same base, evaluate; one summary.json",
                        _call("launch.pipeline:main", status_of=int)),
}


def usage() -> str:
    return "\n".join(f"  trainrig {c.usage}\n      {c.help}" for c in COMMANDS.values())


@exit_on_usage_error
def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of: {', '.join(COMMANDS)} (see trainrig --help)", file=sys.stderr)
        sys.exit(2)
    return COMMANDS[command].run(rest)


if __name__ == "__main__":
    sys.exit(main())  # as the console script does: the command's status is the process's
