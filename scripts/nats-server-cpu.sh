#!/usr/bin/env bash
# nats-server's own CPU time per NATS `send`, switchboard against the raw async-nats client.
#
# Reads the CPU time (user + system, in clock ticks) of the local nats-server process from
# /proc around `switchboard-bench --only <side> --workloads rr` runs at scale 1 and scale 3;
# the difference is the server's cost of the extra requests alone (connection set-up and
# stream creation cancel out). Sides alternate; each is run ITERATIONS times.
#
#   scripts/nats-server-cpu.sh [ITERATIONS]    (default 4; needs nats-server on this machine)
set -euo pipefail
cd "$(dirname "$0")/.."

iterations="${1:-4}"
pid="$(pgrep -o -x nats-server || true)"
if [[ -z "$pid" ]]; then
    echo "no nats-server process on this machine (scripts/brokers starts one)" >&2
    exit 1
fi
cargo build --quiet --profile bench-release -p switchboard-conformance --bin switchboard-bench
bench=target/bench-release/switchboard-bench
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }

declare -A total
for _ in $(seq "$iterations"); do
    for scale in 1 3; do
        for side in switchboard raw; do
            before="$(ticks)"
            "$bench" --transport nats --only "$side" --workloads rr --runs 2 --scale "$scale" \
                --out /dev/null >/dev/null 2>&1
            after="$(ticks)"
            total[$side$scale]=$(( ${total[$side$scale]:-0} + after - before ))
        done
    done
done
hz="$(getconf CLK_TCK)"
for side in switchboard raw; do
    extra=$(( total[${side}3] - total[${side}1] ))
    echo "$side: nats-server used ${extra} ticks (1/${hz} s) for the extra requests"
done
echo "ratio switchboard/raw: $(awk -v a="$(( total[switchboard3] - total[switchboard1] ))" \
    -v b="$(( total[raw3] - total[raw1] ))" 'BEGIN { printf "%.2f\n", a / b }')"
