"""slurm/pretrain.sbatch and slurm/sft.sbatch on a real one-node Slurm (slurm_cluster.py), two CPU
ranks per job over gloo: the jobs complete and final/ loads; a job warned with SIGUSR2 mid-run
saves, requeues itself, resumes and ends with the losses of an uninterrupted job; a bad config
fails the job with status 2 before any step starts.

Loss tolerance 1e-6: the requeued job replays the same fp32 CPU computation on the same samples in
the same order (data position and RNG streams come from the checkpoint; two gloo ranks reduce in a
fixed order), so its losses are expected to match bit for bit. Anything that shifted the data by one
batch or lost the optimizer state moves them by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from conftest import REPO, read_losses

pytestmark = pytest.mark.slow
TOLERANCE = 1e-6
STEPS = 60
JOB_TIMEOUT = 300  # seconds; a job here takes ~20 s, a requeued one ~50 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    slurm_cluster.install()
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def submit(cluster, sbatch: str, config: Path, logs: Path, *flags: str) -> str:
    """The README's command with the overrides a CPU node needs: no GPUs, 2 CPU ranks."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {"TRAINRIG_NPROC_PER_NODE": "2", "TRAINRIG_LOG_DIR": str(logs), "TRAINRIG_PYTHON": sys.executable,
           "PYTHONUNBUFFERED": "1"}
    return cluster.sbatch(["--gpus-per-node=0", f"--cpus-per-task={min(2, os.cpu_count() or 1)}", "--time=15",
                           f"--output={logs}/%x-%j.out", f"slurm/{sbatch}", str(config), *flags], cwd=REPO, env=env)


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def pretrain_settings(corpus, tokenizer_dir, out: Path) -> dict:
    # block 128 x micro 8 per rank: ~0.3 s a step with 2 ranks here, ~20 s of training to interrupt
    return {"train_files": [str(corpus)], "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny",
            "block_size": 128, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": STEPS,
            "logging_steps": 1, "learning_rate": 1e-3, "seed": 3, "output_dir": str(out)}


def log_of(logs: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted(logs.glob(f"*-{job_id}.out")))


def assert_completed(cluster, job_id: str, logs: Path) -> dict:
    info = cluster.wait(job_id, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log_of(logs, job_id)[-6000:]}"
    return info


@pytest.fixture(scope="module")
def pretrain_reference(cluster, corpus, tokenizer_dir, tmp_path_factory):
    """An uninterrupted sbatch slurm/pretrain.sbatch job: (job id, logs dir, output dir)."""
    root = tmp_path_factory.mktemp("sbatch_pretrain")
    config = write_config(root / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, root / "out"))
    job_id = submit(cluster, "pretrain.sbatch", config, root / "logs")
    assert_completed(cluster, job_id, root / "logs")
    return job_id, root / "logs", root / "out"


def test_pretrain_sbatch_completes_and_final_loads(pretrain_reference):
    from transformers import AutoModelForCausalLM

    job_id, logs, out = pretrain_reference
    log = log_of(logs, job_id)
    assert "world 2" in log and "rendezvous: c10d at" in log, log[-3000:]
    assert "resume: none, starting at step 0" in log and "chosen:" in log  # the plan table
    assert f"training completed at step {STEPS}" in log
    assert (logs / f"trainrig-pretrain-{job_id}.attempt0.log").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["strategy"]["name"] == "ddp"
    assert sorted(read_losses(out)) == list(range(1, STEPS + 1))
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_sft_sbatch_completes_and_final_loads(cluster, chat_dir, sft_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = {"train_files": [str(chat_dir / "sft.jsonl")], "model_name_or_path": str(sft_model_dir),
                "max_seq_length": 128, "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1,
                "learning_rate": 1e-3, "seed": 3, "output_dir": str(tmp_path / "out")}
    config = write_config(tmp_path / "sft.yaml", settings)
    job_id = submit(cluster, "sft.sbatch", config, tmp_path / "logs", "--max_steps", "8")  # a flag after the config wins
    assert_completed(cluster, job_id, tmp_path / "logs")
    log = log_of(tmp_path / "logs", job_id)
    assert "world 2" in log and "training completed at step 8" in log, log[-3000:]
    assert sorted(read_losses(tmp_path / "out")) == list(range(1, 9))
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")


def test_reward_sbatch_completes(cluster, sft_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {a} plus 2?", "chosen": f"{a + 2}, right.", "rejected": f"{a + 3}, wrong."}) + "\n"
                             for a in range(64)))
    settings = {"train_files": [str(pairs)], "model_name_or_path": str(sft_model_dir), "max_seq_length": 64,
                "per_device_train_batch_size": 4, "max_steps": 4, "logging_steps": 1, "seed": 3, "output_dir": str(tmp_path / "out")}
    job_id = submit(cluster, "reward.sbatch", write_config(tmp_path / "reward.yaml", settings), tmp_path / "logs")
    assert_completed(cluster, job_id, tmp_path / "logs")
    log = log_of(tmp_path / "logs", job_id)
    assert "trainrig reward: Slurm job" in log and "world 2" in log and "training completed at step 4" in log, log[-3000:]
    assert "eval_accuracy" in (tmp_path / "out" / "summary.json").read_text()


def test_usr2_saves_requeues_and_resumes_to_the_same_losses(cluster, pretrain_reference, corpus, tokenizer_dir, tmp_path):
    _, _, reference_out = pretrain_reference
    expected = read_losses(reference_out)
    out, logs = tmp_path / "out", tmp_path / "logs"
    config = write_config(tmp_path / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, out))
    job_id = submit(cluster, "pretrain.sbatch", config, logs)

    # what --signal=B:USR2@N does before a time limit, sent by hand once training is under way;
    # twice, the second while the ranks stop and save
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline and len(read_losses(out) if (out / "metrics.jsonl").is_file() else {}) < 10:
        time.sleep(0.2)
    cluster.signal_batch(job_id, "USR2")
    time.sleep(0.3)
    cluster.signal_batch(job_id, "USR2")

    info = assert_completed(cluster, job_id, logs)
    log = log_of(logs, job_id)
    assert info["Restarts"] == "1", f"{info}\n{log[-6000:]}"
    first = json.loads((logs / f"trainrig-pretrain-{job_id}.attempt0.status.json").read_text())
    second = json.loads((logs / f"trainrig-pretrain-{job_id}.attempt1.status.json").read_text())
    stopped_at = first["step"]
    assert first["status"] == "stopped" and 10 <= stopped_at < STEPS, (first, log[-6000:])
    assert second == {**second, "status": "completed", "step": STEPS, "resumed_from_step": stopped_at}
    assert f"requeueing job {job_id}" in log and f"resume: from {out / f'checkpoint-{stopped_at}'}" in log
    attempt1 = (logs / f"trainrig-pretrain-{job_id}.attempt1.log").read_text()
    assert "attempt 2 of job" in attempt1 and f"resumed from {out / f'checkpoint-{stopped_at}'}" in attempt1

    got = read_losses(out)  # metrics.jsonl holds both attempts: steps 1..k, then k+1..STEPS
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= TOLERANCE, f"max |loss difference| {worst:.2e} after resuming at step {stopped_at}"


def test_bad_config_fails_the_job_with_status_2_before_srun(cluster, tmp_path):
    config = write_config(tmp_path / "bad.yaml", {"model_preset": "tiny", "learning_rate": "fast", "output_dir": str(tmp_path / "out")})
    job_id = submit(cluster, "pretrain.sbatch", config, tmp_path / "logs")
    info = cluster.wait(job_id, JOB_TIMEOUT)
    log = log_of(tmp_path / "logs", job_id)
    assert info["ExitCode"] == "2:0" and "learning_rate" in log, f"{info}\n{log[-3000:]}"
    assert "node 0/1" not in log  # no step was started
