#!/bin/bash
# zeroforge pre-training on a Slurm cluster.
#
#   sbatch slurm/pretrain.sh cluster=h100 model=llama-1b                  (arguments: Hydra overrides)
#   sbatch slurm/pretrain.sh --config-dir ./myconf experiment=mine        (and Hydra's options)
#   sbatch --nodes=4 --time=2-00:00:00 --partition=gpu slurm/pretrain.sh cluster=h100 model=llama-8b
#   zeroforge launch cluster=h100 cluster.nodes=4 model=llama-8b       (validates, then submits this)
#
# Every #SBATCH line below is a default; a flag on the sbatch command line overrides it. One srun
# task per node starts torchrun, which starts cluster.nproc_per_node training processes (one per
# GPU). The job finds the zeroforge installation, and python, in the environment it was submitted
# from (sbatch passes that environment on). cluster.nodes is always the allocation's node count.
#
# Preemption: Slurm sends USR1 to this script --signal seconds before the time limit (or on
# `scancel --signal=USR1 --batch <job>`); the script asks the trainer to stop, the trainer commits a
# checkpoint at the next step boundary and exits, and the script requeues the job, which resumes
# from that checkpoint. A job that finished, or failed for real, is not requeued.
#
# Hangs: a job whose ranks stop making progress ends with a report naming the stuck ranks' nodes
# (exit 76, trainer/watchdog.py), as does one whose node never reaches the rendezvous; the script
# requeues it with those nodes excluded, at most cluster.max_hang_requeues times.
#
#SBATCH --job-name=zeroforge
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out

# Not -e: the script must outlive a failed training step to decide whether to requeue.
set -uo pipefail

# After the trainer committed a checkpoint and asked to continue: requeue this job, which then
# resumes from that checkpoint. Where Slurm refuses (a job or cluster that does not allow requeueing,
# a controller out of reach), exiting 0 would leave the job COMPLETED with training unfinished: the
# job fails instead, with why and the command that resumes the run, and the trainer's exit code for
# "stopped at a committed checkpoint, start me again" (75, EX_TEMPFAIL), which tells it apart from a
# failed training (1) or a refused config (2).
requeue_or_fail() {
    local out
    if out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
        exit 0
    fi
    requeue_failed "$ZF_REQUEUE_EXIT_CODE" "scontrol requeue ${SLURM_JOB_ID} failed: ${out:-no message}" "$@"
}

# After a hang (launcher/hang_requeue.py): requeue this job without the stuck nodes ($1, a comma
# list, may be empty). Slurm changes a job's excluded nodes only while it is pending, so the job is
# requeued held, given its nodes to leave out, and released. The requeue signals this script, which
# by then has nothing left to stop. Where Slurm refuses, the job fails with the hang's exit code.
requeue_without_or_fail() {
    local nodes=$1 out excluded
    shift
    trap '' USR1 TERM
    if [[ -z "$nodes" ]]; then
        out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1) && exit 0
        requeue_failed "$ZF_HANG_EXIT_CODE" "scontrol requeue ${SLURM_JOB_ID} failed: ${out:-no message}" "$@"
    fi
    if ! out=$(scontrol requeuehold "$SLURM_JOB_ID" 2>&1); then
        requeue_failed "$ZF_HANG_EXIT_CODE" "scontrol requeuehold ${SLURM_JOB_ID} failed: ${out:-no message}" "$@"
    fi
    excluded=$(scontrol show job "$SLURM_JOB_ID" | grep -oE 'ExcNodeList=[^ ]+' | cut -d= -f2)
    [[ "$excluded" == "(null)" ]] && excluded=""
    if ! out=$(scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="${excluded:+$excluded,}$nodes" 2>&1); then
        echo "zeroforge: could not exclude ${nodes} from job ${SLURM_JOB_ID} (${out:-no message}); it may run there again"
    fi
    if ! out=$(scontrol release "$SLURM_JOB_ID" 2>&1); then
        requeue_failed "$ZF_HANG_EXIT_CODE" "job ${SLURM_JOB_ID} is requeued but held: scontrol release failed (${out:-no message}); release it with: scontrol release ${SLURM_JOB_ID}" "$@"
    fi
    exit 0
}

requeue_failed() {
    local code=$1 why=$2
    shift 2
    {
        echo "zeroforge: ${why}"
        echo "zeroforge: training is unfinished; resubmit the job to resume from the checkpoint it just committed:"
        resubmit_command "$@"
    } >&2
    exit "$code"
}

# A new job that resumes the run: the launcher's own sbatch command where it submitted this job with
# the config it froze, else this installation's script with the same arguments from the directory
# it was submitted from, on the allocation the job can see.
resubmit_command() {
    if [[ -f "$ZF_RUN_DIR/sbatch.txt" && "$*" == "--config-path $ZF_RUN_DIR --config-name $ZF_JOB_CONFIG" ]]; then
        echo "    $(cat "$ZF_RUN_DIR/sbatch.txt")"
        return
    fi
    local cmd=(sbatch "--job-name=$SLURM_JOB_NAME" "--nodes=$SLURM_JOB_NUM_NODES")
    local flag variable
    for flag in partition account qos; do
        variable="SLURM_JOB_${flag^^}"
        if [[ -n "${!variable:-}" ]]; then cmd+=("--$flag=${!variable}"); fi
    done
    if [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then cmd+=("--gpus-per-node=$SLURM_GPUS_PER_NODE"); fi
    printf '    cd %q &&' "$SLURM_SUBMIT_DIR"
    printf ' %q' "${cmd[@]}" "$ZF_SCRIPT" "$@"
    echo
    echo "zeroforge: add the other sbatch flags it was submitted with (such as --time), which a job cannot see."
}

# Sourced (by the tests), the script only defines its functions.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

: "${SLURM_JOB_ID:?zeroforge: submit this script with sbatch (see its first lines); it needs a Slurm job}"

# Compose the arguments (the generic Slurm cluster unless they name another, the allocation's node
# count), validate against this allocation, prepare the data once and freeze the config into
# run.dir/job.yaml, before any node starts a rank.
ZF_JOB_ENV=$(mktemp)
export ZF_JOB_ENV
python -m zeroforge.launcher.job "$@" || exit $?
# shellcheck disable=SC1090
source "$ZF_JOB_ENV"
rm -f "$ZF_JOB_ENV"

mkdir -p "$ZF_RUN_DIR/logs"
log="$ZF_RUN_DIR/logs/slurm-${SLURM_JOB_ID}.out"
if [[ "$(readlink -f /proc/$$/fd/1)" != "$(readlink -f "$log")" ]]; then
    exec > >(tee -a "$log") 2>&1  # the run directory keeps the log, wherever --output points
fi

# Slurm's node names need not resolve; the address Slurm itself uses does.
node_addr() { scontrol show node "$1" | grep -oE 'NodeAddr=[^ ]+' | cut -d= -f2; }
export -f node_addr
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
endpoint="$(node_addr "$head_node"):$((15000 + SLURM_JOB_ID % 15000))"  # two jobs on a node: two ports
echo "zeroforge: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES} nodes x ${ZF_NPROC_PER_NODE} processes, rendezvous at ${endpoint}, run directory ${ZF_RUN_DIR}"

# The trainer answers a stop request through files: torchrun would neither pass USR1 on nor keep
# the trainer's exit code. A request left by an earlier job does not apply to this one.
rm -f "$ZF_RUN_DIR/stop-requested" "$ZF_RUN_DIR/requeue.json"
# Each node's torchrun marks its start here: a node missing after a failed rendezvous hung before it.
ZF_NODES_STARTED="$ZF_RUN_DIR/hangs/started-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
export ZF_NODES_STARTED
rm -rf "$ZF_NODES_STARTED"
mkdir -p "$ZF_NODES_STARTED"
touch "$ZF_NODES_STARTED/.attempt"
request_stop() {
    echo "zeroforge: job ${SLURM_JOB_ID} got a stop signal; the trainer saves at its next step and stops"
    touch "$ZF_RUN_DIR/stop-requested"
}
trap request_stop USR1 TERM

# --kill-on-bad-exit: a node that fails (or cannot reach the rendezvous within its timeout) ends
# the whole job at once instead of leaving the others waiting.
# zeroforge.launcher.torchrun is torchrun exiting with the ranks' own codes (2: a user error they
# explained). Every rank composes the frozen job.yaml, not the script's arguments.
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec python -m zeroforge.launcher.torchrun \
        --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$ZF_NPROC_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$0" --rdzv-id="$SLURM_JOB_ID" \
        --rdzv-conf="join_timeout=$ZF_RDZV_TIMEOUT" --local-addr="$(node_addr "$SLURMD_NODENAME")" \
        --max-restarts=0 -m zeroforge.trainer.train --config-path "$ZF_RUN_DIR" --config-name "$ZF_JOB_CONFIG"' "$endpoint" &
srun_pid=$!
# wait returns early when a trapped signal arrives; go on waiting for srun itself.
while :; do
    wait "$srun_pid"
    status=$?
    if [[ $status -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    break
done

if [[ -f "$ZF_RUN_DIR/requeue.json" ]]; then
    echo "zeroforge: the trainer committed a checkpoint and asked to continue ($(cat "$ZF_RUN_DIR/requeue.json")); requeueing job ${SLURM_JOB_ID}"
    rm -f "$ZF_RUN_DIR/requeue.json"
    requeue_or_fail "$@"
fi
if [[ $status -ne 0 ]]; then
    # A hang (the ranks' report, or a node that never started) goes again without its stuck nodes.
    nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
    decision=$(python -m zeroforge.launcher.hang_requeue "$ZF_RUN_DIR" "$status" "$ZF_NODES_STARTED" "$nodes" "$ZF_MAX_HANG_REQUEUES")
    if [[ $? -eq $ZF_HANG_EXIT_CODE ]]; then
        status=$ZF_HANG_EXIT_CODE
        if [[ "$decision" == requeue* ]]; then
            rm -rf "$ZF_NODES_STARTED"
            requeue_without_or_fail "${decision#requeue }" "$@"
        fi
    fi
fi
rm -rf "$ZF_NODES_STARTED"
echo "zeroforge: job ${SLURM_JOB_ID} training exited with status ${status}"
exit "$status"
