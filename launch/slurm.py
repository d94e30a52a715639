"""The Python half of slurm/common.sh. slurm/pretrain.sbatch, sft.sbatch and reward.sbatch run one
trainrig stage on a Slurm allocation: one srun task per node, each starting torchrun for that
node's ranks.

    python -m launch.slurm header <entry script> [run flags]
        runs on the batch node before any step starts. It prints the job, the attempt, the nodes, the
        world, the rendezvous endpoint, the plan and the resume point. A bad config exits 2 here.
    python -m launch.slurm node <entry script> [run flags]
        runs on every node (srun, one task per node) and execs torchrun for this node.
    python -m launch.slurm outcome <status file> <srun exit status> <signal the batch shell got, or ""> [attempt log]
        runs after the step. It says how the attempt ended (a failure: the node Slurm saw fail first
        and trainrig's own error, from the attempt's log), requeues the job when the run stopped on
        Slurm's warning signal, and exits with the job's status: 0 done, 75 stopped with a checkpoint,
        anything else failed.

Slurm itself only names the nodes (SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID). The head
node hosts torchrun's c10d rendezvous at a port derived from the job id, so a requeued job
finds the same endpoint and two jobs sharing a head node do not collide. If the head node cannot
be resolved, the job stops. It never falls back to localhost: each node would then form a world
of its own and wait for the others forever.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.planner.files import rendezvous_port
from trainers.errors import UsageError, exit_on_usage_error
from trainers.stages import stage_of_script
from trainers.stopping import STOPPED_EXIT_STATUS

NPROC_ENV = "TRAINRIG_NPROC_PER_NODE"  # ranks per node where the allocation has no GPUs (CPU nodes, CI)


@dataclasses.dataclass(frozen=True)
class Job:
    """One attempt of a Slurm job, as its environment describes it."""

    job_id: str
    name: str
    attempt: int  # SLURM_RESTART_COUNT: 0, then 1, 2, ... after each requeue
    nodelist: str
    nodes: int
    node_rank: int
    ranks_per_node: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def port(self) -> int:
        return rendezvous_port(self.job_id)


def job_from_env(env: dict | None = None) -> Job:
    """The job this process runs in; a UsageError outside Slurm or with an allocation that
    cannot place ranks."""
    from launch.planner.hardware import slurm_allocation

    env = os.environ if env is None else env
    slurm = slurm_allocation(env)
    if slurm is None:
        raise UsageError("not inside a Slurm job (no SLURM_JOB_ID): submit with sbatch slurm/pretrain.sbatch or "
                         "slurm/sft.sbatch, or run the entry script with torchrun/python directly")
    requested = env.get(NPROC_ENV, "")
    if requested and not (requested.isdigit() and int(requested) > 0):
        raise UsageError(f"{NPROC_ENV}={requested!r}: give a positive number of ranks per node")
    # one rank per GPU of the node; on a node without GPUs as many CPU ranks (gloo) as asked, else one
    ranks = int(requested) if requested else (slurm.gpus_per_node or 1)
    return Job(job_id=slurm.job_id, name=env.get("SLURM_JOB_NAME", "trainrig"),
               attempt=int(env.get("SLURM_RESTART_COUNT", "0") or 0), nodelist=slurm.nodelist, nodes=slurm.nodes,
               node_rank=int(env.get("SLURM_NODEID", "0") or 0), ranks_per_node=ranks, gpus_per_node=slurm.gpus_per_node)


def allocation_hosts(nodelist: str, run=subprocess.run) -> list[str]:
    """The allocation's hosts (`scontrol show hostnames`); the first is the head node, where the rendezvous lives."""
    never = "not falling back to localhost: each node would form its own world and wait forever"
    if not nodelist:
        raise UsageError(f"SLURM_JOB_NODELIST is empty, so the head node is unknown; {never}")
    try:
        proc = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError(f"scontrol is not on PATH on {os.uname().nodename}, so the head node of {nodelist} is unknown; "
                         f"put Slurm's client commands on PATH in the job; {never}") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"scontrol show hostnames {nodelist} did not answer in 60 s; {never}") from None
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise UsageError(f"scontrol show hostnames {nodelist} failed (exit {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-300:]}); {never}")
    return hosts


def head_node(nodelist: str, run=subprocess.run) -> str:
    return allocation_hosts(nodelist, run)[0]


def node_command(job: Job, head: str, script: str, args: list[str], python: str = sys.executable) -> list[str]:
    """This node's torchrun: every node names the same head-node endpoint and job id, so they
    meet in one rendezvous; --max_restarts 0 because a failed rank resumes from a checkpoint
    after a requeue, not by restarting in place."""
    return [python, "-m", "torch.distributed.run",
            "--nnodes", str(job.nodes), "--node_rank", str(job.node_rank), "--nproc_per_node", str(job.ranks_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head}:{job.port}", "--rdzv_id", job.job_id,
            "--max_restarts", "0", script, *args]


def _check_script(script: str) -> str:
    stage_of_script(script)  # slurm/common.sh runs a registered stage's entry script, nothing else
    return script


# ------------------------------------------------------------------------------ subcommands


def header(script: str, args: list[str]) -> int:
    """What a person reading the job's log needs first: the job, where it runs, the plan, and
    where it resumes. The config is parsed exactly as the ranks will parse it."""
    from launch.planner import hardware
    from launch.plan import _opted_in, request_for, table
    from launch.planner.search import plan
    from trainers.checkpoint import resolve_resume, step_of
    from trainers.config import parse_run
    from trainers.setup import keep_resumed_global_batch

    job = job_from_env()
    hosts = allocation_hosts(job.nodelist)
    head = hosts[0]
    registered = stage_of_script(script)
    run = parse_run(registered.config, args, prog=script)
    keep_resumed_global_batch(run, job.world_size)  # as the ranks will: a requeue onto other nodes keeps the global batch
    cfg = run.cfg
    stage = registered.plan_name(cfg)
    print(f"trainrig {stage}: Slurm job {job.job_id} ({job.name}), attempt {job.attempt + 1}"
          f"{' (requeued ' + str(job.attempt) + ' time(s))' if job.attempt else ''}")
    print(f"nodes: {job.nodes} ({', '.join(hosts)}); {job.ranks_per_node} rank(s) per node "
          f"({'one per GPU' if job.gpus_per_node else 'CPU, gloo'}); world {job.world_size}")
    print(f"rendezvous: c10d at {head}:{job.port} (head node, port from the job id)")
    hw = hardware.resolve(cfg.dist.hardware, local_only=False)
    if cfg.dist.hardware == "auto":  # the batch node sees its own devices; the world is the allocation's
        hw = dataclasses.replace(hw, devices_per_node=job.ranks_per_node, nodes=job.nodes)
    notes: list[str] = []
    result = plan(request_for(run, stage, hw, _opted_in(cfg), notes))
    result.notes[:0] = notes
    print(table(result))
    out = Path(cfg.run.output_dir)
    resume = resolve_resume(cfg.run.resume, out, hashes=False)  # the ranks check the hashes when they start
    print(f"output: {out.resolve()}")
    print(f"resume: from {resume} (step {step_of(resume)}){other_world(resume, job.world_size, cfg.batch.global_batch_size)}" if resume else
          f"resume: none, starting at step 0 (--resume {cfg.run.resume})", flush=True)
    return 0


def other_world(checkpoint: Path, world: int, global_batch: int) -> str:
    """What a resume on another number of ranks (a requeue onto other nodes) does, for the header;
    `global_batch`: the job's, the checkpoint's unless --global_batch_size names another."""
    from trainers.checkpoint import saved_state

    try:
        saved = saved_state(checkpoint)
    except (OSError, ValueError, KeyError):  # the ranks say why when they verify it
        return ""
    if saved["world_size"] == world:
        return ""
    if global_batch != saved["global_batch"]:
        return (f"; saved by {saved['world_size']} ranks with a global batch of {saved['global_batch']}, this job asks for "
                f"{global_batch}: the ranks will refuse it (drop --global_batch_size, or give {saved['global_batch']})")
    zero = " and ZeRO's partitions converted (DeepSpeed's universal checkpoint)" if (checkpoint / "deepspeed").is_dir() else ""
    return (f"; saved by {saved['world_size']} ranks, this job has {world}: the global batch of {saved['global_batch']} is kept "
            f"(the accumulation recomputed), the data position split anew{zero}")


def node(script: str, args: list[str]) -> int:
    """Exec torchrun for this node. torchrun itself ignores SIGUSR2: Slurm signals every process
    of the step, and torchrun's default would be to die and orphan its workers. The workers
    install their own handler (trainers/stopping.py), which replaces the inherited SIG_IGN."""
    job = job_from_env()
    command = node_command(job, head_node(job.nodelist), _check_script(script), args)
    print(f"{time.strftime('%H:%M:%S')} node {job.node_rank}/{job.nodes} ({os.uname().nodename}): {' '.join(command[:16])} ...", flush=True)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    os.execv(command[0], command)
    return 0  # not reached


# srun's report of a task that ended badly ("srun: error: trn2: task 1: Killed", "... tasks 0-1: Exited with
# exit code 1"), of a node Slurm lost ("srun: error: Node failure on trn2"), and of it ending the step after
# the first bad task (--kill-on-bad-exit: "srun: launch/slurm: _step_signal: Terminating StepId=8.0")
_SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+?)\s*$", re.M)
_SRUN_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (\S+)", re.M)
_SRUN_TERMINATING = re.compile(r"^srun: .*Terminating (StepId|job step)", re.M)


def failure_summary(log: str) -> str:
    """Why an attempt failed, from its log, in one clause. A node whose task srun saw die by a signal
    (killed, out of memory, crashed) before it ended the step is named first: the tasks after that
    line are the ones srun then terminated. Otherwise trainrig's own first error line leads, and the
    node whose task exited first follows."""
    lost = _SRUN_NODE_FAILURE.findall(log)
    terminating = _SRUN_TERMINATING.search(log)
    first = _SRUN_TASK_ERROR.findall(log[:terminating.start()] if terminating else log) or _SRUN_TASK_ERROR.findall(log)
    error = next((line.strip() for line in log.splitlines() if line.startswith("error: ")), None)
    if lost:
        return "; ".join([f"Slurm lost node {lost[0]}", *([error] if error else [])])
    if not first:
        return error or ""
    node, task, what = first[0]
    if what.startswith("Exited with exit code"):
        return "; ".join([*([error] if error else []), f"the first task to end was node {node}'s (srun: task {task}: {what})"])
    others = sorted({n for n, _, _ in _SRUN_TASK_ERROR.findall(log)} - {node})
    return "; ".join([f"node {node} failed first (srun: task {task}: {what})" +
                      (f"; the ranks on {', '.join(others)} stopped when they lost it" if others else ""), *([error] if error else [])])


def read_settled(path: Path, quiet_s: float = 0.5, limit_s: float = 5.0) -> str:
    """A log another process (the batch shell's tee) may still be appending to: read once its size
    has held for `quiet_s` (srun's last lines reach it a moment after srun exits), at most `limit_s`."""
    deadline, size = time.monotonic() + limit_s, -1
    while path.is_file() and path.stat().st_size != size and time.monotonic() < deadline:
        size = path.stat().st_size
        time.sleep(quiet_s)
    return path.read_text(errors="replace") if path.is_file() else ""


def outcome(status_file: str, srun_status: int, batch_signal: str, job_id: str, run=subprocess.run, log: str = "") -> int:
    """How the attempt ended, and the job's exit status: 0 completed, 75 stopped with a complete
    checkpoint, else failed. Reads the status file rank 0 wrote (trainers/stopping.py) and the
    step's exit status.

    The job requeues itself (`scontrol requeue`) only when the batch shell got SIGUSR2, the
    warning before a time limit or preemption, and this attempt made progress. A run that cannot
    get past its resume point must not requeue forever. A stop on SIGTERM (scancel, or a
    preemption that Slurm requeues by itself) is not requeued here."""
    path = Path(status_file)
    status = json.loads(path.read_text()) if path.is_file() else None
    if status is None:
        why = failure_summary(log)
        print(f"training failed (srun exit {srun_status}) before it finished or saved a stop checkpoint"
              f"{': ' + why if why else ''}; see the log above; not requeueing (the same command resumes from the "
              f"newest complete checkpoint)", flush=True)
        return srun_status or 1
    if status["status"] == "completed":
        print(f"training completed at step {status['step']}; outputs in {status['output_dir']}", flush=True)
        return 0
    where = f"stopped at step {status['step']} ({status['reason']}); {status['checkpoint']} is complete"
    if srun_status:  # torchrun reports its workers' status 75 as a failure, with a ChildFailedError report
        where += f" (the ranks exited with status {STOPPED_EXIT_STATUS}, which torchrun reports above as a failure)"
    if batch_signal != "USR2":
        print(f"{where}; not requeueing, since the job was {'sent SIG' + batch_signal if batch_signal else 'not warned by Slurm'}: "
              f"submit the same command again to resume", flush=True)
        return STOPPED_EXIT_STATUS
    if status["step"] <= status["resumed_from_step"]:
        print(f"{where}, but this attempt made no progress past step {status['resumed_from_step']}; not requeueing "
              f"(give the job a longer --time or an earlier --signal=B:USR2@<seconds>)", flush=True)
        return STOPPED_EXIT_STATUS
    print(f"{where}; requeueing job {job_id}: the next attempt resumes from it (--resume auto)", flush=True)
    try:
        proc = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        problem = None if proc.returncode == 0 else f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    except FileNotFoundError:
        problem = "scontrol is not on PATH"
    except subprocess.TimeoutExpired:
        problem = "scontrol did not answer in 60 s"
    if problem:
        print(f"error: scontrol requeue {job_id} failed ({problem}); submit the same command again to resume "
              f"from {status['checkpoint']}", flush=True)
    return STOPPED_EXIT_STATUS  # requeued or not, this attempt ends stopped with a checkpoint


@exit_on_usage_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "header":
        return header(argv[1], argv[2:])
    if len(argv) >= 2 and argv[0] == "node":
        return node(argv[1], argv[2:])
    if len(argv) in (4, 5) and argv[0] == "outcome":
        log = read_settled(Path(argv[4])) if len(argv) == 5 and int(argv[2]) != 0 else ""
        return outcome(argv[1], int(argv[2]), argv[3], job_from_env().job_id, log=log)
    raise UsageError("usage: python -m launch.slurm {header,node} <entry script> [run flags] | "
                     "outcome <status file> <srun exit status> <signal> [attempt log]")


if __name__ == "__main__":
    sys.exit(main())
