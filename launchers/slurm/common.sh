# shellcheck shell=bash
# Sourced by the sbatch scripts in this directory. Every site-specific value is an environment variable with a
# default; export it before `sbatch` (sbatch forwards the environment) or set it in the script's #SBATCH lines.
#
#   LAYERMOE_ROOT   the repository checkout on a shared filesystem   (default: $SLURM_SUBMIT_DIR)
#   LAYERMOE_VENV   virtual environment to activate if it exists      (default: $LAYERMOE_ROOT/.venv)
#   GPUS_PER_NODE   ranks per node                                    (default: $SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT     rendezvous port on the first node                 (default: 29500 + job id % 1000)
#   DEEPSPEED       the DeepSpeed launcher                            (default: deepspeed)
#   HOSTFILE_DIR    where the generated hostfile goes, on a shared filesystem (default: $LAYERMOE_ROOT/runs/hostfiles)
#   LAYERMOE_REQUEUE  1: requeue the job after a SIGTERM (--signal=B:TERM@N, preemption); 0: just exit (default 1)
#
# sbatch copies the script elsewhere, so paths are taken from LAYERMOE_ROOT, never from $0.

LAYERMOE_ROOT="${LAYERMOE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
LAYERMOE_VENV="${LAYERMOE_VENV:-$LAYERMOE_ROOT/.venv}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
MASTER_PORT="${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}"
LAYERMOE_REQUEUE="${LAYERMOE_REQUEUE:-1}"
HOSTFILE_DIR="${HOSTFILE_DIR:-$LAYERMOE_ROOT/runs/hostfiles}"
export LAYERMOE_ROOT GPUS_PER_NODE MASTER_PORT

layermoe_init() {  # hostfile, rendezvous address, environment
    : "${SLURM_JOB_NODELIST:?not inside a Slurm allocation (submit with sbatch)}"
    cd "$LAYERMOE_ROOT" || return 1
    if [ -f "$LAYERMOE_VENV/bin/activate" ]; then
        # shellcheck disable=SC1091
        source "$LAYERMOE_VENV/bin/activate"
    fi
    mkdir -p "$HOSTFILE_DIR"
    HOSTFILE="$HOSTFILE_DIR/hostfile.${SLURM_JOB_ID:-0}"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$GPUS_PER_NODE" 'NF { print $1 " slots=" slots }' \
        >"$HOSTFILE"
    NNODES="$(wc -l <"$HOSTFILE")"
    MASTER_ADDR="$(head -n 1 "$HOSTFILE" | cut -d ' ' -f 1)"
    export HOSTFILE NNODES MASTER_ADDR
    echo "layermoe: job ${SLURM_JOB_ID:-?} on $NNODES node(s) x $GPUS_PER_NODE ranks, rendezvous $MASTER_ADDR:$MASTER_PORT"
}

PREEMPTED=0
layermoe_step() {  # COMMAND...: run in the background so a SIGTERM reaches us now, forward it, wait for the save
    "$@" &
    local pid=$! rc=0
    # shellcheck disable=SC2064
    trap "PREEMPTED=1; echo 'layermoe: SIGTERM: telling the trainers to save and stop'; kill -TERM $pid 2>/dev/null || true" TERM
    wait "$pid" || rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait for the real exit
        rc=0
        wait "$pid" || rc=$?
    done
    trap - TERM
    if [ "$PREEMPTED" = 1 ]; then
        if [ "$LAYERMOE_REQUEUE" = 1 ]; then
            echo "layermoe: requeueing job $SLURM_JOB_ID; it resumes from the newest complete checkpoint"
            scontrol requeue "$SLURM_JOB_ID"
        fi
        exit 0
    fi
    return "$rc"
}

layermoe_on_all_nodes() {  # SCRIPT ARGS...: one DeepSpeed launcher per node (launchers/slurm/node.sh), no SSH
    layermoe_step srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL \
        bash "$LAYERMOE_ROOT/launchers/slurm/node.sh" "$@"
}

layermoe_on_one_node() {  # COMMAND...: a single process on the first node
    layermoe_step srun --nodes=1 --ntasks=1 --export=ALL "$@"
}
