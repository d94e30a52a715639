"""The training stages, registered once. Everything that lists or dispatches stages reads this
table: the CLI (`trainrig <stage>`, `trainrig launch <stage>`, `trainrig inspect <stage>`), the
planner (what the model runs per sample), the Slurm job scripts and the tests.

Adding a stage is one module under trainers/ with `train(run)`, its `trainrig inspect` view, its
thin entry script under launch/, its slurm/<name>.sbatch, and one `Stage(...)` below; the test
suite checks that each of them exists and that `trainrig --help` lists the stage.

Imports nothing heavy: the trainer and inspect functions are named, not imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from trainers.config import DPOConfig, PretrainConfig, RewardConfig, SFTConfig
from trainers.errors import UsageError

REPO = Path(__file__).resolve().parents[1]  # entry scripts and job scripts are named relative to it


@dataclass(frozen=True)
class Stage:
    """One training stage and what the rest of trainrig needs to know about it."""

    name: str  # the command (`trainrig sft`) and plan.json's stage
    help: str  # one line for `trainrig --help`
    config: type  # its dataclass config (flags, YAML keys, --help)
    module: str  # the module with train(run)
    entry_script: str  # what launchers run, relative to the repository root
    sbatch: str  # the Slurm job script, relative to the repository root
    inspector: str  # "module:function" of `trainrig inspect <name>`: function(run, num_samples, output, color) -> stats
    samples: str = "sequences"  # what a sample is, in plan tables ("pairs")
    sequences_per_sample: int = 1  # rows the model runs per training sample (a preference pair: 2)
    vocab_head: bool = True  # ends in the vocabulary projection (False: a scalar score head)
    masked_rows: bool = True  # rows are packed or padded, so SDPA/eager get an attention mask (full blocks: none)
    from_checkpoint: str = ""  # the planner's name for this stage when --model_name_or_path is given

    def train(self, run) -> dict:
        return importlib.import_module(self.module).train(run)

    def inspect(self, run, num_samples: int, output: str, color: bool) -> dict:
        module, function = self.inspector.split(":")
        return getattr(importlib.import_module(module), function)(run, num_samples, output, color)

    def plan_name(self, cfg) -> str:
        """The planner's stage for this config: continued pretraining is pretraining's entry
        script from a checkpoint (its weights are read, not initialised)."""
        return self.from_checkpoint if self.from_checkpoint and cfg.model.model_name_or_path else self.name

    def loads_weights(self, plan_name: str) -> bool:
        """Whether the run under this planner name reads its weights from a checkpoint (loaded
        sharded under ZeRO-3) rather than initialising them."""
        return not self.from_checkpoint or plan_name == self.from_checkpoint


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", "pretraining from scratch (--model_preset) or continued (--model_name_or_path) on packed blocks",
          PretrainConfig, "trainers.pretrain", "launch/pretrain.py", "slurm/pretrain.sbatch",
          "launch.inspect_data:inspect_pretrain",           masked_rows=False, from_checkpoint="cpt"),
    Stage("sft", "supervised fine-tuning on chat data, assistant-only loss, full or LoRA",
          SFTConfig, "trainers.sft", "launch/sft.py", "slurm/sft.sbatch",
          "launch.inspect_data:inspect_sft"),
    Stage("reward", "a reward model (scalar head) on chosen/rejected pairs, full or LoRA",
          RewardConfig, "trainers.reward", "launch/reward.py", "slurm/reward.sbatch",
          "launch.inspect_data:inspect_reward",           samples="pairs", sequences_per_sample=2, vocab_head=False),
    Stage("dpo", "preference optimisation of an SFT model on chosen/rejected pairs: DPO, IPO, hinge, SimPO or ORPO, full or LoRA",
          DPOConfig, "trainers.dpo", "launch/dpo.py", "slurm/dpo.sbatch",
          "launch.inspect_data:inspect_dpo",              samples="pairs", sequences_per_sample=2),
)}


def plan_names() -> dict[str, Stage]:
    """Every name the planner takes (`trainrig plan --stage`, `trainrig launch`): the stages and
    their from-checkpoint variants ("cpt")."""
    names = {}
    for stage in STAGES.values():
        names[stage.name] = stage
        if stage.from_checkpoint:
            names[stage.from_checkpoint] = stage
    return names


def stage_named(name: str, what: str, names: dict[str, Stage] | None = None) -> Stage:
    """The stage called `name`; a usage error listing the known ones otherwise."""
    names = STAGES if names is None else names
    if name not in names:
        raise UsageError(f"{what}: unknown stage {name!r}; one of {', '.join(names)}")
    return names[name]


def stage_of_script(script: str) -> Stage:
    """The stage an entry script path (as launchers write it, e.g. launch/sft.py) belongs to."""
    for stage in STAGES.values():
        if script == stage.entry_script:
            return stage
    raise UsageError(f"entry script {script!r}: one of {', '.join(s.entry_script for s in STAGES.values())}")
