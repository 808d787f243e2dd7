#!/usr/bin/env bash
# There: wait up to $1 seconds while training runs are alive, then print each run's latest lines.
end=$(( $(date +%s) + ${1:-300} ))
while pgrep -f "[b]enchmarks[.]train_d2l" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
for d in /root/runs/*/; do
  echo "== $d ($(pgrep -f "[w]ork $d" >/dev/null && echo running || echo done))"
  grep -v "^Converting\|it/s\]" "$d/stdout.txt" | tail -n ${LINES_PER_RUN:-4} | cut -c1-400
done
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
