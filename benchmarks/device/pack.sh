#!/usr/bin/env bash
# There: wait up to $WAIT s for the runs named in $RUNS to finish, then tar each into 15 MiB parts under $OUT.
# NO_CKPT=1 leaves out/checkpoint/ out (the weights, fetched earlier): four runs' tables then fit one call.
set -uo pipefail
end=$(( $(date +%s) + ${WAIT:-0} ))
for r in $RUNS; do
  while pgrep -f "[w]ork /root/runs/$r/" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  pgrep -f "[w]ork /root/runs/$r/" >/dev/null && echo "$r still running: packing what is there"
  X=(); [ "${NO_CKPT:-0}" = 1 ] && X=(--exclude=out/checkpoint)
  tar -C /root/runs/$r -czf - "${X[@]}" stdout.txt out | split -b 15M -d - "$OUT/$r.tgz.part"
done
ls -la "$OUT"
