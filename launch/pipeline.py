"""`trainrig pipeline --config pipeline.yaml`: for several datasets in turn, fine-tune the same base
model (SFT, LoRA by default), evaluate it, and write one summary.json with each round's train
loss, EM/F1 and timings.

    base_model: outputs/pretrain/final        # every round starts from these weights
    output_dir: outputs/pipeline              # round <name>/ under it, and summary.json
    datasets:                                 # one round each, in this order
      - name: people
        train_files: [data/people_train.jsonl]
        eval_files: [data/people_test.jsonl]
    sft: {lora_r: 16, max_steps: 300, max_seq_length: 512}   # launch/sft.py flags for every round
    evaluate: {max_new_tokens: 32}                          # launch/evaluate.py flags
    launcher: [torchrun, --nproc_per_node, "2"]             # optional: how to start each step

Each step runs as its own process, so nothing of one round (weights, optimizer, caches in memory)
can reach the next: every round loads the base model from disk, and the summary records the
base's checksum at the start of each round. A round that fails is reported with its error and the
others still run; the exit status is 0 only when every round succeeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trainers.errors import UsageError, exit_on_usage_error

LAUNCH_DIR = Path(__file__).resolve().parent
KEYS = {"base_model", "output_dir", "datasets", "sft", "evaluate", "launcher"}
DATASET_KEYS = {"name", "train_files", "eval_files"}
SUMMARY_FILE = "summary.json"


def load_pipeline(path: Path) -> dict:
    """The pipeline file, checked: unknown keys, missing ones and wrong types are errors naming them."""
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(f"--config {path}: {err.strerror}; pass the pipeline YAML") from None
    except yaml.YAMLError as err:
        raise UsageError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: expected a mapping with base_model, output_dir, datasets")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    for key in ("base_model", "output_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise UsageError(f"{path}: '{key}' must be a path")
    datasets = spec.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UsageError(f"{path}: 'datasets' must be a non-empty list of {{name, train_files, eval_files}}")
    names = set()
    for i, ds in enumerate(datasets):
        where = f"{path}: datasets[{i}]"
        if not isinstance(ds, dict) or set(ds) - DATASET_KEYS or not {"name", "train_files", "eval_files"} <= set(ds):
            raise UsageError(f"{where}: needs exactly name, train_files, eval_files (got {sorted(ds) if isinstance(ds, dict) else ds})")
        if ds["name"] in names or not str(ds["name"]).replace("-", "_").replace(".", "_").isidentifier():
            raise UsageError(f"{where}: name {ds['name']!r} must be unique and a plain word (it names the round's directory)")
        names.add(ds["name"])
        for key in ("train_files", "eval_files"):
            if isinstance(ds[key], str):
                ds[key] = [ds[key]]
    for key in ("sft", "evaluate"):
        if not isinstance(spec.setdefault(key, {}), dict):
            raise UsageError(f"{path}: '{key}' must be a mapping of flags, e.g. {{max_steps: 300}}")
    if not isinstance(spec.setdefault("launcher", []), list):
        raise UsageError(f"{path}: 'launcher' must be a list, e.g. [torchrun, --nproc_per_node, '2']")
    return spec


def flags(mapping: dict) -> list[str]:
    """{max_steps: 300, packing: false, eval_files: [a, b]} -> --max_steps 300 --no-packing --eval_files a b"""
    out = []
    for key, value in mapping.items():
        if value is True:
            out.append(f"--{key}")
        elif value is False:
            out.append(f"--no-{key}")
        elif isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def weights_checksum(model_dir: Path) -> str:
    """sha256 over the model directory's weight files, in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise UsageError(f"base_model {model_dir}: no weight files (*.safetensors); pass a model directory, e.g. <run>/final")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_step(command: list[str], log_path: Path) -> tuple[int, float, str]:
    """(exit status, seconds, last lines of output) of one step; its whole output goes to log_path."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    return status, time.perf_counter() - start, "\n".join(tail)


def run_round(spec: dict, ds: dict, out: Path, base: Path) -> dict:
    round_dir = out / ds["name"]
    round_dir.mkdir(parents=True, exist_ok=True)
    result = {"name": ds["name"], "status": "failed", "base_sha256": weights_checksum(base)}
    starter = spec["launcher"] or [sys.executable]
    sft_out = round_dir / "sft"
    sft = [*starter, str(LAUNCH_DIR / "sft.py"), *flags({"lora_r": 16, **spec["sft"]}), "--model_name_or_path", str(base),
           "--train_files", *ds["train_files"], "--output_dir", str(sft_out), "--resume", "never"]
    status, seconds, tail = run_step(sft, round_dir / "sft.log")
    result["train_seconds"] = round(seconds, 1)
    if status != 0:
        return {**result, "error": f"SFT exited {status} (log {round_dir / 'sft.log'}): {tail}"}
    trained = json.loads((sft_out / "summary.json").read_text())
    result.update(train_loss=trained.get("loss"), eval_loss=trained.get("eval_loss"), steps=trained.get("step"))
    lora = (sft_out / "final" / "adapter_config.json").is_file()
    model = ["--model_name_or_path", str(base), "--adapter_path", str(sft_out / "final")] if lora else \
        ["--model_name_or_path", str(sft_out / "final")]
    evaluate = [*starter, str(LAUNCH_DIR / "evaluate.py"), *flags(spec["evaluate"]), *model, "--eval_files", *ds["eval_files"],
                "--output_dir", str(round_dir / "eval")]
    status, seconds, tail = run_step(evaluate, round_dir / "evaluate.log")
    result["eval_seconds"] = round(seconds, 1)
    if status != 0:
        return {**result, "error": f"evaluation exited {status} (log {round_dir / 'evaluate.log'}): {tail}"}
    report = json.loads((round_dir / "eval" / "report.json").read_text())
    return {**result, "status": "ok", "em": report["em"], "f1": report["f1"], "n": report["n"], "datasets": report["datasets"]}


@exit_on_usage_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--config":
        raise UsageError("usage: trainrig pipeline --config pipeline.yaml (see launch/pipeline.py for its keys)")
    spec = load_pipeline(Path(argv[1]))
    out, base = Path(spec["output_dir"]), Path(spec["base_model"])
    original = weights_checksum(base)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"base_model": str(base), "base_sha256": original, "rounds": []}
    for ds in spec["datasets"]:
        print(f"=== round {ds['name']}: SFT on {' '.join(ds['train_files'])} from {base}, then evaluate", flush=True)
        result = run_round(spec, ds, out, base)
        summary["rounds"].append(result)
        print(f"    {result['status']}: " + (f"EM {result['em']:.3f} F1 {result['f1']:.3f} over {result['n']}, train loss "
              f"{result['train_loss']:.3f}" if result["status"] == "ok" else result["error"]), flush=True)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")  # after every round: progress survives a crash
    if weights_checksum(base) != original:
        raise RuntimeError(f"{base} changed during the pipeline: rounds did not all start from the same weights")
    failed = [r["name"] for r in summary["rounds"] if r["status"] != "ok"]
    print(f"summary: {out / SUMMARY_FILE}" + (f"; failed rounds: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
