"""launch/slurm.py without a cluster: the per-node torchrun line of a 2-node x 8-GPU allocation
(the GPU counts a CPU test cluster cannot have), the head-node rule, and what an attempt's outcome
decides (exit status, requeue or not, the node named when one failed)."""

from __future__ import annotations

import json
import subprocess

import pytest

from launch.planner.files import rendezvous_port
from launch.slurm import failure_summary, head_node, job_from_env, node_command, outcome
from trainers.errors import UsageError
from trainers.stopping import STOPPED_EXIT_STATUS


def two_nodes(node_id: int, **extra) -> dict:
    """What Slurm exports to the task on node `node_id` of `sbatch --nodes=2 --gpus-per-node=h100:8`."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "trainrig-sft", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
            "SLURM_NODEID": str(node_id), "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_GPUS_PER_NODE": "h100:8", **extra}


def fake_scontrol(hosts: str, returncode: int = 0, stderr: str = ""):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode, stdout=hosts, stderr=stderr)

    run.calls = calls
    return run


def test_two_node_command_lines_meet_at_the_head_node():
    scontrol = fake_scontrol("gpu-a07\ngpu-a08\n")
    lines = []
    for node_id in (0, 1):
        job = job_from_env(two_nodes(node_id))
        head = head_node(job.nodelist, run=scontrol)
        lines.append(node_command(job, head, "launch/sft.py", ["--config", "x.yaml"], python="python"))
    assert scontrol.calls[0] == ["scontrol", "show", "hostnames", "gpu-a[07-08]"]
    port = rendezvous_port("4242")
    for node_id, line in enumerate(lines):
        flags = dict(zip(line[3:-3:2], line[4:-3:2]))
        assert line[:3] == ["python", "-m", "torch.distributed.run"] and line[-3:] == ["launch/sft.py", "--config", "x.yaml"]
        assert flags == {"--nnodes": "2", "--node_rank": str(node_id), "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                         "--rdzv_endpoint": f"gpu-a07:{port}", "--rdzv_id": "4242", "--max_restarts": "0"}
    assert 20000 <= port < 30000 and rendezvous_port("4243") != port  # per job: two jobs on one head node do not collide


def test_ranks_per_node_come_from_the_allocation():
    assert job_from_env(two_nodes(0, SLURM_GPUS_PER_NODE="4")).ranks_per_node == 4
    assert job_from_env(two_nodes(0, SLURM_GPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="h100:8")).world_size == 16
    cpu = job_from_env(two_nodes(0, SLURM_GPUS_PER_NODE="0", TRAINRIG_NPROC_PER_NODE="2"))
    assert (cpu.ranks_per_node, cpu.gpus_per_node, cpu.world_size) == (2, 0, 4)
    assert job_from_env(two_nodes(0, SLURM_GPUS_PER_NODE="0")).ranks_per_node == 1
    assert job_from_env(two_nodes(0, SLURM_RESTART_COUNT="2")).attempt == 2
    with pytest.raises(UsageError, match="TRAINRIG_NPROC_PER_NODE='two'"):
        job_from_env(two_nodes(0, TRAINRIG_NPROC_PER_NODE="two"))
    with pytest.raises(UsageError, match="not inside a Slurm job"):
        job_from_env({})


def test_an_unresolvable_head_node_stops_the_job_instead_of_using_localhost():
    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    with pytest.raises(UsageError, match="scontrol is not on PATH.*not falling back to localhost"):
        head_node("gpu-a[07-08]", run=missing)
    with pytest.raises(UsageError, match="exit 1: invalid hostlist.*not falling back to localhost"):
        head_node("gpu-a[07-", run=fake_scontrol("", returncode=1, stderr="invalid hostlist"))
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST is empty"):
        head_node("", run=fake_scontrol("x"))


# ------------------------------------------------------------------------------- outcome


def status_file(tmp_path, **status) -> str:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"reason": "a stop signal reached 2 of 2 rank(s)", "output_dir": "out",
                                "checkpoint": "out/checkpoint-30", **status}))
    return str(path)


def test_a_warned_run_that_saved_and_progressed_requeues(tmp_path, capsys):
    scontrol = fake_scontrol("")
    path = status_file(tmp_path, status="stopped", step=30, resumed_from_step=10)
    assert outcome(path, 1, "USR2", "4242", run=scontrol) == STOPPED_EXIT_STATUS
    assert scontrol.calls == [["scontrol", "requeue", "4242"]]
    assert "requeueing job 4242" in capsys.readouterr().out


@pytest.mark.parametrize("signal_name, step, why", [("TERM", 30, "sent SIGTERM"), ("", 30, "not warned by Slurm"),
                                                    ("USR2", 10, "made no progress past step 10")])
def test_stops_that_must_not_requeue(tmp_path, capsys, signal_name, step, why):
    scontrol = fake_scontrol("")
    path = status_file(tmp_path, status="stopped", step=step, resumed_from_step=10)
    assert outcome(path, 1, signal_name, "4242", run=scontrol) == STOPPED_EXIT_STATUS
    assert scontrol.calls == [] and why in capsys.readouterr().out


def test_completed_failed_and_a_missing_scontrol(tmp_path, capsys):
    assert outcome(status_file(tmp_path, status="completed", step=60, resumed_from_step=30), 0, "USR2", "1") == 0
    assert outcome(str(tmp_path / "never-written.json"), 1, "", "1") == 1  # a crash: srun's status, no requeue
    assert "training failed (srun exit 1)" in capsys.readouterr().out

    def missing(command, **kwargs):
        raise FileNotFoundError(command[0])

    stopped = status_file(tmp_path, status="stopped", step=30, resumed_from_step=0)
    assert outcome(stopped, 1, "USR2", "4242", run=missing) == STOPPED_EXIT_STATUS  # non-zero, and no hang
    assert "error: scontrol requeue 4242 failed (scontrol is not on PATH); submit the same command again" in capsys.readouterr().out


def test_a_failed_attempt_names_the_node_that_failed_first(tmp_path, capsys):
    """The task srun saw fail before it ended the step is named, not those it then terminated;
    trainrig's own error line follows (srun's lines as Slurm 22.05 writes them)."""
    killed = ("step 12/40 loss 5.1\n"
              "srun: error: trn2: task 1: Killed\n"
              "srun: launch/slurm: _step_signal: Terminating StepId=8.0\n"
              "slurmstepd-trn1: error: *** STEP 8.0 ON trn1 CANCELLED AT 2026-12-07T00:15:15 ***\n"
              "srun: error: trn1: task 0: Exited with exit code 1\n")
    assert outcome(str(tmp_path / "never-written.json"), 137, "", "7", log=killed) == 137
    out = capsys.readouterr().out
    assert ("training failed (srun exit 137) before it finished or saved a stop checkpoint: node trn2 failed first "
            "(srun: task 1: Killed); the ranks on trn1 stopped when they lost it; see the log above; not requeueing") in out, out
    refused = ("error: --output_dir /scratch/out: rank 0 on node trn1 wrote a file there that node trn2 (rank 1) cannot see\n"
               "srun: error: trn1: task 0: Exited with exit code 1\n"
               "srun: launch/slurm: _step_signal: Terminating StepId=3.0\n"
               "srun: error: trn2: task 1: Terminated\n")
    assert failure_summary(refused) == ("error: --output_dir /scratch/out: rank 0 on node trn1 wrote a file there that node trn2 "
                                        "(rank 1) cannot see; the first task to end was node trn1's (srun: task 0: Exited with exit code 1)")
    assert failure_summary("srun: error: Node failure on trn2\nsrun: error: trn1: task 0: Exited with exit code 1\n") == \
        "Slurm lost node trn2"
    assert failure_summary("") == ""


def test_the_log_is_read_once_its_writer_has_stopped(tmp_path):
    """outcome reads the attempt's log while the batch shell's tee may still append srun's last lines."""
    import threading

    from launch.slurm import read_settled

    log = tmp_path / "attempt0.log"
    log.write_text("step 12/40\n")

    def late_line():
        with open(log, "a") as f:
            f.write("srun: error: trn2: task 1: Killed\n")

    threading.Timer(0.2, late_line).start()
    assert read_settled(log, quiet_s=0.5).endswith("task 1: Killed\n")
    assert read_settled(tmp_path / "never-written.log") == ""


def test_the_header_says_what_a_resume_on_another_world_size_does(tmp_path):
    from launch.slurm import other_world

    checkpoint = tmp_path / "checkpoint-11"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 11, "world_size": 4, "micro_batch": 4, "accumulation": 1,
                                                               "global_batch": 16}))
    assert other_world(checkpoint, 4, 16) == ""
    assert other_world(checkpoint, 2, 16) == ("; saved by 4 ranks, this job has 2: the global batch of 16 is kept (the accumulation "
                                              "recomputed), the data position split anew and ZeRO's partitions converted "
                                              "(DeepSpeed's universal checkpoint)")
    assert "this job asks for 32: the ranks will refuse it (drop --global_batch_size, or give 16)" in other_world(checkpoint, 2, 32)
