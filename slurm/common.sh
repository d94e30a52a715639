# slurm/common.sh -- sourced by slurm/pretrain.sbatch and slurm/sft.sbatch; runs one trainrig stage
# on the allocation. The logic lives in launch/slurm.py, and this file only does what a shell
# must do: hold the log, trap Slurm's signal, and start and wait for the srun step.
#
#   batch node:  launch.slurm header   job, nodes, world, plan, resume point (a bad config exits 2 here)
#   every node:  srun (one task per node) -> launch.slurm node -> torchrun -> the entry script's ranks
#   batch node:  launch.slurm outcome  completed (exit 0) | stopped with a checkpoint (75, requeued
#                                      after SIGUSR2) | failed (naming the node that failed first)
#
# Preemption and time limits: the sbatch scripts ask for `--signal=B:USR2@<seconds>`, so Slurm
# warns only this shell. The shell forwards SIGUSR2 to srun, and srun passes it to every process
# of the step. The ranks then agree at the next step boundary, save one checkpoint and exit 75
# (trainers/stopping.py). The outcome step sees that and runs `scontrol requeue`, and the
# requeued attempt resumes with --resume auto.
#
# Settings from the environment (sbatch passes the submitting shell's environment on):
#   TRAINRIG_HOME            the trainrig checkout (default: the directory sbatch was run from)
#   TRAINRIG_PYTHON          the Python to use (default: $TRAINRIG_HOME/.venv/bin/python, else python3)
#   TRAINRIG_NPROC_PER_NODE  ranks per node on nodes without GPUs (default: one per GPU, else 1)
#   TRAINRIG_LOG_DIR         where each attempt's log and status go (default: $TRAINRIG_HOME/slurm/logs)

trainrig_slurm_run() {
    local script=$1
    shift
    local home=${TRAINRIG_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "error: $script: not inside a Slurm job; submit it with sbatch (see README, Slurm)" >&2
        return 2
    fi
    if [ ! -f "$home/$script" ]; then
        echo "error: $home/$script not found: run sbatch from the trainrig checkout or set TRAINRIG_HOME" >&2
        return 2
    fi
    cd "$home" || return 2
    local python=${TRAINRIG_PYTHON:-}
    if [ -z "$python" ]; then
        if [ -x .venv/bin/python ]; then python=$PWD/.venv/bin/python; else python=$(command -v python3); fi
    fi

    # one log per attempt beside Slurm's own (which --open-mode=append keeps across requeues)
    local attempt=${SLURM_RESTART_COUNT:-0}
    local log_dir=${TRAINRIG_LOG_DIR:-$home/slurm/logs}
    mkdir -p "$log_dir" || return 2
    local base="$log_dir/${SLURM_JOB_NAME:-trainrig}-$SLURM_JOB_ID.attempt$attempt"
    exec > >(tee -a "$base.log") 2>&1
    local tee_pid=$!
    export TRAINRIG_STATUS_FILE="$base.status.json"
    rm -f "$TRAINRIG_STATUS_FILE"
    echo "=== $(date '+%F %T') attempt $((attempt + 1)) of job $SLURM_JOB_ID; log $base.log; python $python"

    "$python" -m launch.slurm header "$script" "$@"
    local status=$?
    if [ $status -ne 0 ]; then
        exec >&- 2>&-; wait "$tee_pid"
        return $status
    fi

    # a signal interrupts `wait`; the trap forwards it and the loop waits again for srun to end
    local got_signal=""
    local srun_pid=""
    trap 'got_signal=USR2; echo "$(date +%T) SIGUSR2 from Slurm: asking the ranks to save and stop"; [ -n "$srun_pid" ] && kill -USR2 "$srun_pid"' USR2
    trap 'got_signal=TERM; echo "$(date +%T) SIGTERM: asking the ranks to save and stop"; [ -n "$srun_pid" ] && kill -TERM "$srun_pid"' TERM
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
        --kill-on-bad-exit=1 "$python" -m launch.slurm node "$script" "$@" &
    srun_pid=$!
    status=0
    while true; do
        wait "$srun_pid"
        status=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR2 TERM

    "$python" -m launch.slurm outcome "$TRAINRIG_STATUS_FILE" "$status" "$got_signal" "$base.log"
    status=$?
    echo "=== $(date '+%F %T') attempt $((attempt + 1)) of job $SLURM_JOB_ID ends with status $status"
    exec >&- 2>&-; wait "$tee_pid"
    return $status
}
