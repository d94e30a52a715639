"""slurm/*.sbatch on a real two-node Slurm cluster (slurm_cluster.py), CPU ranks over gloo.

One node (2 ranks): the jobs complete and final/ loads; a bad config fails the job with status 2
before any step starts. Two nodes (1 rank each, over the veth link): pretraining and SFT equal the
one-node jobs of the same global batch, and a pretraining job warned with SIGUSR2 stops on both
nodes after the same step, saves one checkpoint, requeues itself and resumes to the same losses; a node
whose training processes are SIGKILLed fails the job within a bounded time, named in its last line,
and the same command resumes from the last complete checkpoint; a job requeued onto fewer nodes
(4 ranks on 2 nodes -> 2 ranks on 1) continues as the one-node run would, under DDP and ZeRO-2; a
node that cannot see the output directory stops the job at start, named.

Tolerances. 1e-6 where the same fp32 computation runs in the same order: 2 ranks on one node and
1 rank on each of two nodes reduce with the same two-rank gloo algorithm, and a resumed job
replays the same samples with the checkpoint's data position and RNG streams, so the losses match
bit for bit. 1e-5 where the global batch is the same but split otherwise (4 ranks x micro 4 before
the requeue, 2 ranks x micro 4 x accumulation 2 after it, against 2 x micro 8): fp32 sums the same
gradients in another order (~1e-7 relative per step). A batch shifted by one, a sample repeated or
skipped, or lost optimizer state moves a loss by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from conftest import REPO, read_losses

pytestmark = pytest.mark.slow
SAME_ORDER = 1e-6
RESHAPED = 1e-5
STEPS = 40
JOB_TIMEOUT = 300  # seconds; a job here takes ~25-60 s, a requeued one up to ~2 min


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    slurm_cluster.install()
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


def submit(cluster, sbatch: str, config: Path, logs: Path, *flags: str, nodes: str = "1", ranks_per_node: int = 2) -> str:
    """The README's command with the overrides CPU nodes need: no GPUs, `ranks_per_node` gloo
    ranks, one thread each (the two nodes share this machine's cores)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {"TRAINRIG_NPROC_PER_NODE": str(ranks_per_node), "TRAINRIG_LOG_DIR": str(logs), "TRAINRIG_PYTHON": sys.executable,
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count() or 1}", "--time=15",
                           f"--output={logs}/%x-%j.out", f"slurm/{sbatch}", str(config), *flags], cwd=REPO, env=env)


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def pretrain_settings(corpus, tokenizer_dir, out: Path, **overrides) -> dict:
    # block 128 x global batch 16: ~0.3 s a step here, ~15 s of training to interrupt
    return {"train_files": [str(corpus)], "tokenizer_name_or_path": str(tokenizer_dir), "model_preset": "tiny",
            "block_size": 128, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": STEPS,
            "logging_steps": 1, "learning_rate": 1e-3, "seed": 3, "output_dir": str(out), **overrides}


def log_of(logs: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted(logs.glob(f"*-{job_id}.out")))


def attempt_status(logs: Path, job_id: str, attempt: int) -> dict:
    return json.loads(next(logs.glob(f"*-{job_id}.attempt{attempt}.status.json")).read_text())


def assert_completed(cluster, job_id: str, logs: Path) -> dict:
    info = cluster.wait(job_id, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log_of(logs, job_id)[-6000:]}"
    return info


def assert_losses(out: Path, expected: dict[int, float], tolerance: float, steps=None) -> None:
    got = read_losses(out)  # metrics.jsonl holds every attempt: a resumed one continues it
    assert sorted(got) == sorted(steps or expected), sorted(got)
    worst = max(abs(got[s] - expected[s]) for s in got)
    assert worst <= tolerance, f"max |loss difference| {worst:.2e} (tolerance {tolerance:.0e})"


def wait_for_step(out: Path, step: int, job_id: str, cluster) -> None:
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and max(read_losses(out), default=0) >= step:
            return
        if cluster.job(job_id).get("JobState") in slurm_cluster.ENDED:
            raise AssertionError(f"job {job_id} ended before step {step}: {cluster.job(job_id)}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {step} in {JOB_TIMEOUT} s")


# ----------------------------------------------------------------------------- one node


@pytest.fixture(scope="module")
def one_node(cluster, corpus, tokenizer_dir, tmp_path_factory):
    """An uninterrupted one-node job, 2 ranks: (job id, logs dir, output dir, losses). The
    reference every two-node pretraining job is held to."""
    root = tmp_path_factory.mktemp("one_node")
    config = write_config(root / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, root / "out"))
    job_id = submit(cluster, "pretrain.sbatch", config, root / "logs")
    assert_completed(cluster, job_id, root / "logs")
    return job_id, root / "logs", root / "out", read_losses(root / "out")


def test_pretrain_sbatch_completes_and_final_loads(one_node):
    from transformers import AutoModelForCausalLM

    job_id, logs, out, _ = one_node
    log = log_of(logs, job_id)
    assert "world 2" in log and "rendezvous: c10d at" in log, log[-3000:]
    assert "resume: none, starting at step 0" in log and "chosen:" in log  # the plan table
    assert f"training completed at step {STEPS}" in log
    assert (logs / f"trainrig-pretrain-{job_id}.attempt0.log").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["strategy"]["name"] == "ddp"
    assert sorted(read_losses(out)) == list(range(1, STEPS + 1))
    AutoModelForCausalLM.from_pretrained(out / "final")


def sft_settings(chat_dir, sft_model_dir, out: Path) -> dict:
    return {"train_files": [str(chat_dir / "sft.jsonl")], "model_name_or_path": str(sft_model_dir), "max_seq_length": 128,
            "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1, "learning_rate": 1e-3, "seed": 3,
            "output_dir": str(out)}


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


def test_bad_config_fails_the_job_with_status_2_before_srun(cluster, tmp_path):
    config = write_config(tmp_path / "bad.yaml", {"model_preset": "tiny", "learning_rate": "fast", "output_dir": str(tmp_path / "out")})
    job_id = submit(cluster, "pretrain.sbatch", config, tmp_path / "logs")
    info = cluster.wait(job_id, JOB_TIMEOUT)
    log = log_of(tmp_path / "logs", job_id)
    assert info["ExitCode"] == "2:0" and "learning_rate" in log, f"{info}\n{log[-3000:]}"
    assert "node 0/1" not in log  # no step was started


# ---------------------------------------------------------------------------- two nodes


def test_sft_on_two_nodes_equals_one_node(cluster, chat_dir, sft_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    jobs = {}
    for nodes, ranks in (("1", 2), ("2", 1)):
        root = tmp_path / f"nodes{nodes}"
        config = write_config(tmp_path / f"sft{nodes}.yaml", sft_settings(chat_dir, sft_model_dir, root / "out"))
        jobs[nodes] = submit(cluster, "sft.sbatch", config, root / "logs", "--max_steps", "8", nodes=nodes, ranks_per_node=ranks)  # a flag after the config wins
    for nodes, job_id in jobs.items():
        assert_completed(cluster, job_id, tmp_path / f"nodes{nodes}" / "logs")
        log = log_of(tmp_path / f"nodes{nodes}" / "logs", job_id)
        assert f"nodes: {nodes} (" in log and "world 2" in log and "training completed at step 8" in log, log[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "nodes2" / "out" / "final")
    assert_losses(tmp_path / "nodes2" / "out", read_losses(tmp_path / "nodes1" / "out"), SAME_ORDER, steps=range(1, 9))


def test_two_nodes_equal_one_node_and_usr2_stops_both_requeues_and_resumes(cluster, one_node, corpus, tokenizer_dir, tmp_path):
    """1 rank on each node, their gradients reduced across the veth link (not loopback); warned
    mid-run, the job stops on both nodes, requeues, resumes on both, and every step's loss is the
    one-node job's."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    config = write_config(tmp_path / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, out))
    before = cluster.link_bytes()
    job_id = submit(cluster, "pretrain.sbatch", config, logs, nodes="2", ranks_per_node=1)

    # what --signal=B:USR2@N does before a time limit, sent by hand once training is under way;
    # twice, the second while the ranks stop and save
    wait_for_step(out, 10, job_id, cluster)
    cluster.signal_batch(job_id, "USR2")
    time.sleep(0.3)
    cluster.signal_batch(job_id, "USR2")

    info = assert_completed(cluster, job_id, logs)
    carried = cluster.link_bytes() - before
    log = log_of(logs, job_id)
    assert info["Restarts"] == "1" and info["NodeList"] == "trn[1-2]", f"{info}\n{log[-6000:]}"
    assert "nodes: 2 (trn1, trn2); 1 rank(s) per node (CPU, gloo); world 2" in log and "rendezvous: c10d at trn1:" in log, log[-3000:]
    assert " node 0/2 (trn1): " in log and " node 1/2 (trn2): " in log, log[-3000:]
    # each step all-reduces the 0.87M fp32 gradients (3.5 MB) between the nodes
    assert carried > STEPS * 3_000_000, f"only {carried:,} bytes crossed the link between the nodes"
    first, second = attempt_status(logs, job_id, 0), attempt_status(logs, job_id, 1)
    stopped_at = first["step"]
    assert first["status"] == "stopped" and 10 <= stopped_at < STEPS, (first, log[-6000:])
    assert second == {**second, "status": "completed", "step": STEPS, "resumed_from_step": stopped_at}
    assert f"requeueing job {job_id}" in log and f"resume: from {out / f'checkpoint-{stopped_at}'}" in log
    # one checkpoint, written by the ranks of both nodes: each rank's RNG state in it
    checkpoint = out / f"checkpoint-{stopped_at}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert [p.name for p in out.glob("checkpoint-*")] == [checkpoint.name]
    attempt1 = next(logs.glob(f"*-{job_id}.attempt1.log")).read_text()
    assert "attempt 2 of job" in attempt1 and "nodes: 2 (trn1, trn2)" in attempt1 and f"resumed from {checkpoint}" in attempt1
    assert_losses(out, one_node[3], SAME_ORDER)


def test_a_node_killed_mid_run_fails_the_job_naming_it_and_the_next_job_resumes(cluster, one_node, corpus, tokenizer_dir, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    config = write_config(tmp_path / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, out, save_steps=5))
    job_id = submit(cluster, "pretrain.sbatch", config, logs, nodes="2", ranks_per_node=1)
    wait_for_step(out, 12, job_id, cluster)
    killed_at = time.time()
    assert cluster.kill_training(1), "no training process found on trn2"
    info = cluster.wait(job_id, 120)
    failed_after = time.time() - killed_at
    log = log_of(logs, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{log[-6000:]}"
    assert failed_after < 60, f"the job took {failed_after:.0f} s to fail after trn2's processes were killed"
    print(f"\nthe job failed {failed_after:.1f} s after trn2's training processes were killed")  # the figure docs/slurm.md quotes
    last = log.strip().splitlines()[-2]  # the outcome's line, before the shell's closing one
    assert "node trn2" in last and "not requeueing" in last, log[-6000:]
    saved = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    assert saved >= 10

    # the same command again: resumes from the newest complete checkpoint, ends with the uninterrupted losses
    again = submit(cluster, "pretrain.sbatch", config, logs, nodes="2", ranks_per_node=1)
    assert_completed(cluster, again, logs)
    assert f"resume: from {out / f'checkpoint-{saved}'}" in log_of(logs, again)
    assert_losses(out, one_node[3], SAME_ORDER)


@pytest.mark.parametrize("zero_stage", [None, 2], ids=["ddp", "zero2"])
def test_requeued_onto_fewer_nodes_continues_as_the_one_node_run(cluster, one_node, corpus, tokenizer_dir, tmp_path, zero_stage):
    """sbatch --nodes=1-2 gets both nodes: 4 ranks, micro 4 -> global 16. trn2 is drained, then the
    job warned: it saves, requeues, gets trn1 alone and resumes there on 2 ranks (accumulation 2
    from the checkpoint's global batch; ZeRO's partitions through the universal checkpoint)."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    extra = {"zero_stage": zero_stage} if zero_stage else {}
    config = write_config(tmp_path / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, out, per_device_train_batch_size=4, **extra))
    cluster.wait_idle()  # a node still cleaning up after the last job would give this one the other alone
    job_id = submit(cluster, "pretrain.sbatch", config, logs, nodes="1-2", ranks_per_node=2)
    try:
        wait_for_step(out, 10, job_id, cluster)
        cluster.set_node_state("trn2", "DRAIN")  # its running job keeps it; the requeued one cannot have it
        cluster.signal_batch(job_id, "USR2")
        info = assert_completed(cluster, job_id, logs)
    finally:
        cluster.set_node_state("trn2", "RESUME")
    log = log_of(logs, job_id)
    assert info["Restarts"] == "1" and info["NodeList"] == "trn1", f"{info}\n{log[-6000:]}"
    first, second = attempt_status(logs, job_id, 0), attempt_status(logs, job_id, 1)
    stopped_at = first["step"]
    assert second == {**second, "status": "completed", "step": STEPS, "resumed_from_step": stopped_at}, (first, second)
    attempt0 = next(logs.glob(f"*-{job_id}.attempt0.log")).read_text()
    attempt1 = next(logs.glob(f"*-{job_id}.attempt1.log")).read_text()
    assert "nodes: 2 (trn1, trn2); 2 rank(s) per node (CPU, gloo); world 4" in attempt0, attempt0[-3000:]
    assert "nodes: 1 (trn1); 2 rank(s) per node (CPU, gloo); world 2" in attempt1, attempt1[-3000:]
    assert "micro 4 x accumulation 1 x world 4 = global 16" in attempt0 and "micro 4 x accumulation 2 x world 2 = global 16" in attempt1
    # the header planned it so and said what the resume does, before any rank started
    assert "micro batch 4 x accumulation 2 x world 2 = global 16 sequences" in attempt1, attempt1[-3000:]
    assert "saved by 4 ranks, this job has 2: the global batch of 16 is kept" in attempt1, attempt1[-3000:]
    assert f"checkpoint-{stopped_at} was saved by 4 ranks, this run has 2" in attempt1, attempt1[-3000:]
    if zero_stage:
        assert f"checkpoint-{stopped_at} was saved by 4 ranks under ZeRO-2, this run has 2: converted" in attempt1, attempt1[-3000:]
    assert_losses(out, one_node[3], RESHAPED)
    loaded = re.search(r"resumed from \S+ at step \d+ .*, loaded in ([\d.]+) s", attempt1)
    assert loaded, attempt1[-3000:]
    converted = re.search(r"converted to DeepSpeed's universal checkpoint \S+ in ([\d.]+) s", attempt1)
    # the figures docs/slurm.md quotes, from the logs' times
    print(f"\n{'ZeRO-2' if zero_stage else 'DDP'} 4 -> 2 ranks: header {elapsed(attempt0, ATTEMPT, NODE)} s; torchrun to the "
          f"ranks' first line {elapsed(attempt0, NODE, RANK)} s (2 nodes), {elapsed(attempt1, NODE, RANK)} s (requeued, 1 node); "
          f"SIGUSR2 to the next attempt {elapsed(attempt0 + attempt1, SIGNAL, ATTEMPT)} s; checkpoint loaded in {loaded.group(1)} s"
          + (f" ({converted.group(1)} s of it converting)" if converted else ""))


# log lines by their times: an attempt's first line, a node's torchrun line, a rank's first line, the warning
ATTEMPT = r"^=== \S+ (\d\d:\d\d:\d\d) attempt"
NODE = r"^(\d\d:\d\d:\d\d) node 0/"
RANK = r"^(\d\d:\d\d:\d\d) I trainrig\."
SIGNAL = r"^(\d\d:\d\d:\d\d) SIGUSR2 from Slurm"


def elapsed(log: str, start: str, end: str) -> int:
    """Seconds from the first line matching `start` to the next one matching `end`."""
    first = re.compile(start, re.M).search(log)
    assert first, f"no line matching {start!r} in\n{log[-3000:]}"
    then = re.compile(end, re.M).search(log, first.end())
    assert then, f"no line matching {end!r} after {first.group(0)!r} in\n{log[-3000:]}"
    h0, m0, s0 = map(int, first.group(1).split(":"))
    h1, m1, s1 = map(int, then.group(1).split(":"))
    return ((h1 - h0) * 3600 + (m1 - m0) * 60 + s1 - s0) % 86400


def test_a_node_that_cannot_see_the_output_dir_stops_the_job_naming_it(cluster, corpus, tokenizer_dir, tmp_path):
    """--output_dir under the cluster's scratch: shared storage on trn1, a disk of its own on trn2."""
    out, logs = cluster.scratch / tmp_path.name / "out", tmp_path / "logs"
    job_id = submit(cluster, "pretrain.sbatch", write_config(tmp_path / "pretrain.yaml", pretrain_settings(corpus, tokenizer_dir, out)),
                    logs, nodes="2", ranks_per_node=1)
    info = cluster.wait(job_id, JOB_TIMEOUT)
    log = log_of(logs, job_id)
    assert info["JobState"] == "FAILED", f"{info}\n{log[-3000:]}"
    assert (f"error: --output_dir {out}: rank 0 on node trn1 wrote a file there that node trn2 (rank 1) cannot see after" in log
            and "shared storage" in log), log[-3000:]
    assert "step 1/" not in log and not (out / "metrics.jsonl").exists()
    last = log.strip().splitlines()[-2]
    assert "--output_dir" in last, log[-3000:]
