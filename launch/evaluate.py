"""Evaluate a model: EM/F1 of greedy answers on question sets, perplexity on text.

    python launch/evaluate.py --model_name_or_path outputs/sft/final/merged --eval_files data/heldout.jsonl
    python launch/evaluate.py --model_name_or_path outputs/base/final --adapter_path outputs/sft/final --eval_files qa.jsonl wiki.txt
    torchrun --nproc_per_node 4 launch/evaluate.py ...        (the ranks split the questions; same results as one)

Writes report.json (em, f1, n, per dataset) and predictions.jsonl to --output_dir.
"""

from __future__ import annotations

import sys

from trainers.config import EvaluateConfig, parse_config
from trainers.errors import exit_on_usage_error


@exit_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    from trainers.evaluate import evaluate

    return evaluate(parse_config(EvaluateConfig, argv, prog="launch/evaluate.py"))


if __name__ == "__main__":
    from trainers.runtime import exit_process

    main(sys.argv[1:])
    exit_process(0)  # a multi-rank evaluation ends here, past the process group's teardown (Runtime.end)
