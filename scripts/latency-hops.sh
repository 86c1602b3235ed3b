#!/usr/bin/env bash
# Where a sequential `send`'s round trip goes, per process, switchboard against the raw client.
#
# Captures the broker's loopback port with tcpdump while `switchboard-bench --workloads latency`
# runs one side, then splits every round trip (1 in flight) into four hops by the packets' own
# timestamps: the broker passing the request on (client -> responder), the responder (request
# in -> reply out), the broker passing the reply on, and the client (reply in -> next request
# out, which includes decoding the reply and making the next request). Prints the p50, p90 and
# mean of each hop per run. Sides alternate; each is run ITERATIONS times.
#
#   scripts/latency-hops.sh rabbitmq|nats [ITERATIONS] [SCALE]   (defaults 3 and 0.4)
#
# Needs tcpdump (Debian package `tcpdump`) and root (packet capture), and the broker running.
set -euo pipefail
cd "$(dirname "$0")/.."

transport="${1:?usage: scripts/latency-hops.sh rabbitmq|nats [ITERATIONS] [SCALE]}"
iterations="${2:-3}"
scale="${3:-0.4}"
case "$transport" in
    rabbitmq) port=5672 ;;
    nats) port=4222 ;;
    *) echo "transport must be rabbitmq or nats, not \`$transport\`" >&2; exit 2 ;;
esac
if ! command -v tcpdump >/dev/null; then
    echo "tcpdump is not installed (apt-get install tcpdump)" >&2
    exit 1
fi
cargo build --quiet --profile bench-release -p switchboard-conformance --bin switchboard-bench
bench=target/bench-release/switchboard-bench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

analyse() {
    tcpdump -r "$1" -n -tt 2>/dev/null | python3 -c '
import re, statistics, sys
from collections import Counter
port = int(sys.argv[1])
pk = []
for line in sys.stdin:
    m = re.match(r"([\d.]+) IP [\d.]+\.(\d+) > [\d.]+\.(\d+):.*length (\d+)", line)
    if m and int(m.group(4)) > 0:
        pk.append((float(m.group(1)), int(m.group(2)), int(m.group(3))))
# The client connection is the one whose packet to the broker is followed by the broker
# writing to another connection, that one answering, and the broker writing back.
pairs = Counter()
for a, b, c, d in zip(pk, pk[1:], pk[2:], pk[3:]):
    if a[2] == port and b[1] == port and c[2] == port and d[1] == port \
            and b[2] == c[1] and d[2] == a[1] and a[1] != b[2]:
        pairs[(a[1], b[2])] += 1
if not pairs:
    sys.exit("no round trips found in the capture")
(client, responder), _ = pairs.most_common(1)[0]
want = [(client, port), (port, responder), (responder, port), (port, client), (client, port)]
hops, i = [], 0
while i + 5 <= len(pk):
    w = pk[i:i + 5]
    if [(p[1], p[2]) for p in w] == want:
        hops.append([(w[k + 1][0] - w[k][0]) * 1e6 for k in range(4)])
        i += 4
    else:
        i += 1
if not hops:
    sys.exit("no clean round trips found in the capture")
names = ["broker, request", "responder", "broker, reply", "client"]
print(f"  {len(hops)} round trips")
for k, name in enumerate(names):
    v = sorted(h[k] for h in hops)
    print(f"  {name:16} p50 {v[len(v) // 2]:7.1f} us   p90 {v[int(len(v) * 0.9)]:7.1f}   mean {statistics.mean(v):7.1f}")
' "$port"
}

for i in $(seq "$iterations"); do
    for side in switchboard raw; do
        pcap="$work/$side-$i.pcap"
        tcpdump -i lo -n -s 128 -w "$pcap" "tcp port $port" >/dev/null 2>&1 &
        dump=$!
        sleep 1
        "$bench" --transport "$transport" --only "$side" --workloads latency --runs 1 \
            --scale "$scale" --out "$work/out.jsonl" >/dev/null 2>&1
        sleep 0.5
        kill "$dump"
        wait "$dump" 2>/dev/null || true
        p50="$(grep -o '"workload":"rr_latency_p50"[^}]*"value":[0-9.]*' "$work/out.jsonl" | grep -o '[0-9.]*$')"
        echo "$side, run $i: bench p50 ${p50} us"
        analyse "$pcap"
    done
done
