#!/usr/bin/env bash
# `make TARGET` (default: test) on a fresh clone of COMMIT (default: HEAD) with an empty pip cache, as CI
# runs it: every line make prints is timestamped, then each recipe step's seconds and the total are
# printed. The README's set-up figures come from this script (TARGET test; the "before" figure from
# `benchmarks/fresh_clone.sh b66b389 'setup .venv-floor/.setup-stamp setup-vllm'`).
# Usage: benchmarks/fresh_clone.sh [COMMIT] [TARGETS]   (takes 5 to 35 minutes on 2 cores)
set -euo pipefail
commit=${1:-HEAD}
targets=${2:-test}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/danlu-fresh.XXXXXX)
git clone -q "$repo" "$work/clone"
git -C "$work/clone" checkout -q "$commit"
log="$work/make.log"
start=$(date +%s)
status=0
(cd "$work/clone" && PIP_CACHE_DIR="$work/pip-cache" make $targets 2>&1) \
	| while IFS= read -r line; do printf '%s %s\n' "$(date +%s)" "$line"; done > "$log" || status=$?
end=$(date +%s)
# a step's time runs from its line to the next timestamped line
grep -v 'WARNING: Location' "$log" | awk '{t = $1; $1 = ""; if (p != "" && t > p) printf "%6d s %s\n", t - p, substr(prev, 1, 110); p = t; prev = $0}'
# make test runs the floor's and vLLM's targets side by side with --output-sync, so each target's lines
# arrive together when it ends and the step times above do not split that phase; when each environment
# was ready and each pytest run ended, in seconds from the start, does
echo "ended, seconds from the start:"
grep -E 'touch .*setup-stamp|(passed|failed).* in [0-9.]+s' "$log" | grep -v 'WARNING: Location' |
	awk -v start="$start" '{t = $1; $1 = ""; printf "%6d s %s\n", t - start, substr($0, 1, 110)}'
echo "make $targets at $commit: $((end - start)) s in all, exit $status (log: $log; delete $work when done)"
