#!/usr/bin/env bash
# The demo: set-up, then a bootstrap DHT peer, MetaInf trained on the committed meta-training set, a
# broker routing with it, and two nodes that each hold half of the tiny model's blocks (chained over
# gRPC, found through the DHT), three prompts through `dinet-agent submit`, the answers with their
# timings and the method MetaInf chose, and everything it started stopped again. Uses its own
# namespace (dinet-demo), so it never touches other deployments' queues on the same RabbitMQ. Safe to
# run again and again.
#
# The tiny model has random weights: its answers are gibberish by design. Point
# `dinet-node run --model` at a real checkpoint for real text (see README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh

BIN="$ROOT/.venv/bin"
MODEL="${DINET_MODELS_DIR:-$ROOT/.cache/models}/tiny"
NS="${DINET_DEMO_NAMESPACE:-dinet-demo}"
GROUP="demo-cpu"
RUN_DIR="$(mktemp -d -t dinet-demo.XXXXXX)"
PIDS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop_all() {
  local code=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 150); do  # up to 15 s to drain, then force
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $code -ne 0 ]]; then
    echo "demo failed (exit $code); last lines of the logs:" >&2
    tail -n 20 "$RUN_DIR"/*.log >&2 || true
  fi
  rm -rf "$RUN_DIR"
  exit "$code"
}
trap stop_all EXIT INT TERM

wait_for_log() {  # FILE PATTERN PID WHAT
  for _ in $(seq 1 1800); do  # up to 180 s (a busy machine imports torch slowly)
    grep -q "$2" "$1" 2>/dev/null && return 0
    if ! kill -0 "$3" 2>/dev/null; then
      echo "the $4 exited before it was ready; its log:" >&2
      cat "$1" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "the $4 was not ready after 180 s; its log:" >&2
  cat "$1" >&2
  return 1
}

say "starting a bootstrap DHT peer (nodes and brokers find each other through it)"
"$BIN/dinet-node" dht --maddrs-file "$RUN_DIR/peers" >"$RUN_DIR/dht.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 600); do [[ -s "$RUN_DIR/peers" ]] && break; sleep 0.1; done
[[ -s "$RUN_DIR/peers" ]] || { echo "the DHT peer did not start; its log:" >&2; cat "$RUN_DIR/dht.log" >&2; exit 1; }
mapfile -t PEERS <"$RUN_DIR/peers"
echo "DHT: ${PEERS[*]}"

# MetaInf learns from the committed methods benchmark (scripts/bench/methods.py): one row per measured
# (workload, method, hardware profile). Untuned training takes seconds; `dinet-scheduler train` without
# --no-tune searches the hyper-parameters too (docs/scheduler.md).
say "training the MetaInf scheduler on the committed meta-training set (docs/data/methods_dataset.csv)"
HF_HUB_OFFLINE=1 "$BIN/dinet-scheduler" train --dataset "$ROOT/docs/data/methods_dataset.csv" --no-tune \
  --out "$RUN_DIR/metainf-model" >"$RUN_DIR/train.log" 2>&1 || { cat "$RUN_DIR/train.log" >&2; exit 1; }
grep -m1 "^trained on" "$RUN_DIR/train.log" || true

say "starting a broker (namespace $NS, MetaInf scheduler; live groups read from the DHT)"
HF_HUB_OFFLINE=1 "$BIN/dinet-broker" run --namespace "$NS" --initial-peers "${PEERS[@]}" \
  --scheduler metainf --scheduler-model "$RUN_DIR/metainf-model" >"$RUN_DIR/broker.log" 2>&1 &
PIDS+=($!)
wait_for_log "$RUN_DIR/broker.log" "routing with scheduler" "${PIDS[-1]}" broker
echo "broker ready (log: $RUN_DIR/broker.log)"

# Two nodes, each holding half of the tiny model's 4 blocks: neither can answer alone.
for span in 0:2 2:4; do
  say "starting a node serving blocks $span of tiny (group $GROUP)"
  "$BIN/dinet-node" run --model "$MODEL" --model-name tiny --group "$GROUP" --namespace "$NS" \
    --blocks "$span" --initial-peers "${PEERS[@]}" --accelerated \
    --state-dir "$RUN_DIR/node-${span/:/-}" --threads 1 --prefetch 2 >"$RUN_DIR/node-${span/:/-}.log" 2>&1 &
  PIDS+=($!)
done
wait_for_log "$RUN_DIR/node-0-2.log" "ready: model" "${PIDS[-2]}" "node 0:2"
wait_for_log "$RUN_DIR/node-2-4.log" "ready: model" "${PIDS[-1]}" "node 2:4"

say "the swarm as the DHT sees it"
for _ in $(seq 1 30); do  # the second node's records can take a moment to show up
  "$BIN/dinet-node" swarm --initial-peers "${PEERS[@]}" >"$RUN_DIR/swarm.txt" 2>/dev/null || true
  grep -q "complete" "$RUN_DIR/swarm.txt" && break
  sleep 1
done
cat "$RUN_DIR/swarm.txt"

PROMPTS=(
  "def parse(text):"
  "The quick brown fox"
  "import os
import sys
"
)
for i in "${!PROMPTS[@]}"; do
  say "prompt $((i + 1)) of ${#PROMPTS[@]}: $(printf '%q' "${PROMPTS[$i]}")"
  "$BIN/dinet-agent" submit --namespace "$NS" --model tiny --max-new-tokens 32 --timeout 120 "${PROMPTS[$i]}"
done

say "the operator's view: dinet-broker status"
"$BIN/dinet-broker" status --namespace "$NS" --initial-peers "${PEERS[@]}" || true

say "done: three answers through agent -> RabbitMQ -> broker -> node chain (DHT, gRPC) -> agent; stopping what the demo started"
