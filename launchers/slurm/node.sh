#!/usr/bin/env bash
# One task per node (`srun --ntasks-per-node=1`): this node's DeepSpeed launcher, SSH-less
# (`--no_ssh --node_rank $SLURM_NODEID`), every node reading the same hostfile and rendezvous.
# The DeepSpeed runner does not pass SIGTERM on to its workers, and its per-node launcher answers one with a
# 30-second kill; so a SIGTERM here goes straight to the trainers, which finish the step, save and exit 0.
set -euo pipefail
: "${HOSTFILE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:?set by srun}}"
setsid "${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@" &
child=$!
# The trainers are the processes of the launcher's session that carry --local_rank.
trap 'pkill -TERM -s "$child" -f "local_rank=" || kill -TERM "$child" 2>/dev/null || true' TERM INT
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do
    rc=0
    wait "$child" || rc=$?
done
exit "$rc"
