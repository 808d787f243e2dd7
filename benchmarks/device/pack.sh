#!/usr/bin/env bash
# There: wait up to $WAIT s for the runs named in $RUNS to finish, then tar each into 15 MiB parts under $OUT.
set -uo pipefail
end=$(( $(date +%s) + ${WAIT:-0} ))
for r in $RUNS; do
  while pgrep -f "[w]ork /root/runs/$r/" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  pgrep -f "[w]ork /root/runs/$r/" >/dev/null && echo "$r still running: packing what is there"
  tar -C /root/runs/$r -czf - stdout.txt out | split -b 15M -d - "$OUT/$r.tgz.part"
done
ls -la "$OUT"
