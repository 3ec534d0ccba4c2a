# Shared by the slurm/*.sbatch scripts (sourced, not run). Why a separate file: Slurm runs a copy of
# the batch script from its spool directory, so helpers are found through PROJECT_DIR instead.
# Settings read here (environment variables):
#   PROJECT_DIR  repository root (default: the directory sbatch was called from)
#   VENV         virtualenv to activate (default: $PROJECT_DIR/.venv when it exists)
#   SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME: network interface of the ranks (set_socket_ifname)
#   NODES, GPUS_PER_NODE, NTASKS_PER_NODE, CPUS_PER_TASK, TIME, PARTITION, ACCOUNT, SBATCH_ARGS:
#                used only when a script is started with `bash script.sbatch` (self-submission).

# Started outside a job (`bash slurm/x.sbatch`): submit ourselves, turning the by-name settings into
# sbatch flags, since #SBATCH lines cannot read environment variables. `sbatch slurm/x.sbatch`
# with your own flags works too. Usage: submit_self_if_needed SCRIPT TASKS_PER_NODE
submit_self_if_needed() {
    [[ -n "${SLURM_JOB_ID:-}" ]] && return 0
    local script=$1 tasks=$2 gpus=${GPUS_PER_NODE:-0}
    local flags=(--nodes="${NODES:-1}" --ntasks-per-node="$tasks")
    ((gpus > 0)) && flags+=(--gpus-per-node="$gpus")
    [[ -n "${CPUS_PER_TASK:-}" ]] && flags+=(--cpus-per-task="$CPUS_PER_TASK")
    [[ -n "${TIME:-}" ]] && flags+=(--time="$TIME")
    [[ -n "${PARTITION:-}" ]] && flags+=(--partition="$PARTITION")
    [[ -n "${ACCOUNT:-}" ]] && flags+=(--account="$ACCOUNT")
    export PROJECT_DIR=${PROJECT_DIR:-$(cd "$(dirname "$script")/.." && pwd)}
    flags+=(--chdir="$PROJECT_DIR")
    mkdir -p "$PROJECT_DIR/logs"  # sbatch cannot create the directory of --output itself
    # A requeued job may start while its previous incarnation is still exiting on a node (a node failure:
    # the survivors are still being killed); wait for it to let go of OUT/.lock instead of failing for good.
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then ARGS+=(--lock-wait "${LOCK_WAIT:-300}"); fi
    local extra
    read -r -a extra <<< "${SBATCH_ARGS:-}"  # a list of flags on purpose
    echo "+ sbatch ${flags[*]} ${extra[*]} $script" >&2
    exec sbatch "${flags[@]}" "${extra[@]}" "$script"
}

# cd to the project, activate its venv, unbuffered Python (log lines appear as they happen).
setup_job_env() {
    PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$PROJECT_DIR" || exit 1
    local venv=${VENV:-}
    [[ -z "$venv" && -d .venv ]] && venv=.venv
    if [[ -n "$venv" ]]; then
        set +u  # activate scripts read unset variables
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
        set -u
    fi
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}"
}

# Rendezvous: rank 0 runs on the first node; the port is derived from the job id (same rule as
# training.dist.slurm_port) so it is identical everywhere and survives a requeue.
set_rendezvous() {
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')}
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    export MASTER_ADDR MASTER_PORT
}

# Network interface of the ranks' traffic. Gloo (CPU) and NCCL's bootstrap (GPU) otherwise bind to
# whatever the host name resolves to, which on many clusters is a management network that the other
# nodes cannot reach (or a slow one). SOCKET_IFNAME=ib0 sets both GLOO_SOCKET_IFNAME and
# NCCL_SOCKET_IFNAME unless they are already set; sbatch exports the environment into the job and srun
# into every task, so they reach every node. Prints what the job will use.
set_socket_ifname() {
    if [[ -n "${SOCKET_IFNAME:-}" ]]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
    fi
    IFNAMES="GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-<host name>} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<auto>}"
}

# Run a command in the background and forward USR1/TERM to it, so that `--signal=B:USR1@120`
# (delivered to this shell only) reaches the training. With srun, signal srun: it passes the signal
# on to every task. Launchers that do not forward signals (the deepspeed runner dies on USR1) need
# SIGNAL_RANKS=1: signal this node's `python -m $MODULE` processes under the launcher instead (ranks
# on other nodes learn of it when the training all-reduces its stop flag).
# Sets RUN_RC to the command's exit status.
# shellcheck disable=SC2034  # RUN_RC is read by the calling script
run_forwarding_signals() {
    "$@" &
    RUN_CHILD=$!
    trap '_forward USR1' USR1
    trap '_forward TERM' TERM
    while true; do
        RUN_RC=0
        wait "$RUN_CHILD" || RUN_RC=$?
        # A trapped signal interrupts `wait` with 128+n while the child keeps running: wait again.
        kill -0 "$RUN_CHILD" 2>/dev/null || break
    done
    trap - USR1 TERM
}

_forward() {
    echo "$(date +%T) batch script: got $1, forwarding it to the training"
    if [[ "${SIGNAL_RANKS:-0}" == 1 ]]; then
        local pid
        for pid in $(_descendants "$RUN_CHILD"); do
            if tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null |
                awk -v m="${MODULE:-training.pretrain}" 'prev == "-m" && $0 == m { f = 1 } { prev = $0 } END { exit !f }'; then
                kill -s "$1" "$pid" 2>/dev/null || true
            fi
        done
    else
        kill -s "$1" "$RUN_CHILD" 2>/dev/null || true
    fi
}

_descendants() {
    local pid
    for pid in $(ps -o pid= --ppid "$1"); do
        echo "$pid"
        _descendants "$pid"
    done
}

# The training's command line from CONFIG, OUT_DIR, SET, EXTRA_ARGS and RESUME (see pretrain.sbatch).
# Sets the array ARGS and OUT (the output directory, for finding checkpoints).
build_train_args() {
    local kv
    OUT=${OUT_DIR:-}
    for kv in ${SET:-}; do
        if [[ "$kv" == run.out_dir=* ]]; then OUT=${kv#run.out_dir=}; fi
    done
    if [[ -z "$OUT" ]]; then  # the config's own run.out_dir
        OUT=$(python -c 'import sys, yaml; print(((yaml.safe_load(open(sys.argv[1])) or {}).get("run") or {}).get("out_dir") or "")' "$CONFIG")
    fi
    ARGS=(--config "$CONFIG")
    if [[ -n "${OUT_DIR:-}" ]]; then ARGS+=(--out "$OUT_DIR"); fi
    for kv in ${SET:-}; do ARGS+=(--set "$kv"); done
    case "${RESUME:-auto}" in
        always) ARGS+=(--resume) ;;
        never) ;;
        # A requeued job resumes whatever it wrote, even if pre-empted before its first checkpoint.
        auto) if [[ -n "$OUT" && -s "$OUT/checkpoints/latest" ]] || ((${SLURM_RESTART_COUNT:-0} > 0)); then
                  ARGS+=(--resume)
              fi ;;
        *) echo "error: RESUME must be auto, always or never (got '$RESUME')" >&2; exit 2 ;;
    esac
    # A requeued job may start while its previous incarnation is still exiting on a node (a node failure:
    # the survivors are still being killed); wait for it to let go of OUT/.lock instead of failing for good.
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then ARGS+=(--lock-wait "${LOCK_WAIT:-300}"); fi
    local extra
    read -r -a extra <<< "${EXTRA_ARGS:-}"  # a list of arguments on purpose
    ARGS+=("${extra[@]}")
}

# Exit code 75 (EX_TEMPFAIL) from the training = "checkpointed after a pre-emption signal".
# Requeue the job (same id, same port), unless it has already been requeued MAX_REQUEUES times.
requeue_or_exit() {
    local rc=$1
    if ((rc == 75)); then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if ((restarts >= ${MAX_REQUEUES:-50})); then
            echo "error: checkpointed, but the job was already requeued $restarts times (MAX_REQUEUES); not requeueing" >&2
            exit 75
        fi
        echo "$(date +%T) checkpointed after pre-emption: scontrol requeue $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    ((rc == 0)) || echo "error: training exited with code $rc" >&2
    exit "$rc"
}
