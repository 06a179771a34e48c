#!/usr/bin/env bash
# Bring up the Ray cluster a jaxrlhf Ray job runs on (the OpenRLHF-style workflow): run it once on every node.
#
#   head node:    bash scripts/ray_cluster.sh head
#   other nodes:  HEAD_IP=10.0.0.1 bash scripts/ray_cluster.sh worker
#   any node:     bash scripts/ray_cluster.sh stop
#   then submit:  HEAD_IP=10.0.0.1 bash scripts/ray_ppo_job.sh
#
# Every node must reach the head's RAY_PORT and DASHBOARD_PORT and see the same REPO path (a shared filesystem, or
# the same checkout on each node); the JAX trainers also need a free port on trainer 0's node (chosen at launch).
# Verified by the project: `bash -n` only (tests/test_scripts.py); it has not run on a real cluster. On yours:
# after `head`/`worker`, `ray status` must list every node's GPUs before scripts/ray_ppo_job.sh is submitted.
set -euo pipefail

# ---------------------------------------------------------------- knobs (every one overridable from the environment)
ROLE=${1:-${ROLE:-}}                             # head | worker | stop
REPO=${REPO:-$HOME/jaxrlhf}                      # checkout with .venv built by scripts/setup.sh
RAY=${RAY:-$REPO/.venv/bin/ray}                  # the venv's ray command (same Ray version on every node)
HEAD_IP=${HEAD_IP:-}                             # the head node's address (workers join it)
RAY_PORT=${RAY_PORT:-6379}                       # the head's GCS port
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}           # the head's dashboard / job-submission port (ray job submit)
# The dashboard's job API runs any command it is sent: keep it off the network. Default: loopback only; submit
# from the head, or through `ssh -L 8265:127.0.0.1:8265 head`. Set it to the head's cluster-internal address only
# behind a firewall that admits just the cluster. Firewall RAY_PORT and the worker ports to the cluster's nodes too.
DASHBOARD_HOST=${DASHBOARD_HOST:-127.0.0.1}
# Ray's token authentication (every RPC and the dashboard/job API need the token). Ray 2.60 turns it on by itself
# only for a local ray.init() cluster; here it is on unless RAY_AUTH_MODE=disabled. The head makes a token in
# ~/.ray/auth_token if none exists (`ray get-auth-token --generate`); give every worker and job submitter the same
# one: a shared home directory, or RAY_AUTH_TOKEN=$(ssh HEAD cat ~/.ray/auth_token) in their environment.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
NUM_GPUS=${NUM_GPUS:-8}                          # GPUs this node offers Ray (trainers and vLLM engines share them)
NUM_CPUS=${NUM_CPUS:-}                           # CPUs this node offers Ray (empty: all)
EXTRA=${EXTRA:-}                                 # more `ray start` flags, e.g. "--resources='{\"trainer\": 1}'"

cpus=()
[ -n "$NUM_CPUS" ] && cpus=(--num-cpus="$NUM_CPUS")
case "$ROLE" in
  head)
    if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then
      "$RAY" get-auth-token --generate >/dev/null
    fi
    # shellcheck disable=SC2086
    "$RAY" start --head --port="$RAY_PORT" --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" \
      --num-gpus="$NUM_GPUS" "${cpus[@]}" --disable-usage-stats $EXTRA
    ;;
  worker)
    [ -n "$HEAD_IP" ] || { echo "set HEAD_IP to the head node's address" >&2; exit 2; }
    if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] \
       && [ ! -s "$HOME/.ray/auth_token" ]; then
      echo "no Ray token here: set RAY_AUTH_TOKEN to the head's (ssh \$HEAD_IP cat ~/.ray/auth_token)" >&2
      exit 2
    fi
    # shellcheck disable=SC2086
    "$RAY" start --address="$HEAD_IP:$RAY_PORT" --num-gpus="$NUM_GPUS" "${cpus[@]}" --disable-usage-stats $EXTRA
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: bash scripts/ray_cluster.sh head|worker|stop" >&2
    exit 2
    ;;
esac
