#!/bin/bash
# User-space instructions per request of micro.py under callgrind: deterministic, so it judges a
# change even while other work loads the machine (wall-clock and CPU time then do not).
#
#   bench/overhead/callgrind.sh [new|replay] [variant] [N1] [N2]
#   PYTHONPATH=/tmp/snapshot/src bench/overhead/callgrind.sh new   # measure another copy of src/
#
# The figure is (Ir(N2) - Ir(N1)) / (N2 - N1), the convention of RESULTS.md: the difference of
# two runs cancels start-up and imports. micro.py also runs a 10 % warm-up, which the divisor
# leaves out, so the figure is ~1.1x the true cost per request; differences between commits
# keep their proportion. Includes micro.py's per-key Redis clean-up (redis-py), the same for
# every commit. Each run takes 1-3 minutes; a run that fails (a 503 when valgrind is starved
# past the store's 2 s timeout) is tried again.
set -euo pipefail
cd "$(dirname "$0")/../.."
path=${1:-new}
variant=${2:-oncepay-redis}
n1=${3:-500}
n2=${4:-2500}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

instructions() {
    for _ in 1 2 3; do
        if PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
            .venv/bin/python bench/overhead/micro.py --variants "$variant" --paths "$path" \
            -n "$1" >/dev/null 2>"$out/err"; then
            awk '/^(summary|totals):/ {print $2; exit}' "$out/cg"
            return
        fi
    done
    tail -5 "$out/err" >&2
    exit 1
}

a=$(instructions "$n1")
b=$(instructions "$n2")
echo "$path $variant: $(( (b - a) / (n2 - n1) )) instructions per request"
