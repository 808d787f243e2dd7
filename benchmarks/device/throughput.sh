#!/usr/bin/env bash
# There (after stage.sh a..d): tokens/s of S10s2's training mix on GPU 0, the batch drawn ahead on a thread (prefetch)
# against drawn inside the step (MODES), at each batch size of $BATCHES, one run after the other, $SEC seconds of
# training each; prints per-run means over logged steps > $SKIP. PARALLEL=1: the modes side by side on GPUs GPU0, GPU0+1, ...
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 D2L_DATA_DIR=/root/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SEC=${SEC:-90}; SKIP=${SKIP:-50}; BATCHES=${BATCHES:-32}
# NPROC=2: one data-parallel run of two ranks sharing GPU 0 (gloo); batch = per rank, tok/s = all ranks
LAUNCH="python3"; [ "${NPROC:-1}" -gt 1 ] && LAUNCH="torchrun --nproc-per-node $NPROC"
MIX="facts_varied/1:1.0,facts_varied/2-4+d1*3:0.4,facts/1:0.3,facts/2-4+d1:0.25,needle_para/1-4+d1:0.7,needle/1-4:0.4,text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2"
mkdir -p /root/tp
TA=(); [ -f .stage/ta/teacher_answers.json.gz ] && TA=(--teacher-answers .stage/ta/teacher_answers.json.gz)
run_mode() {  # mode batch gpu
  local m=$1 batch=$2 gpu=$3 mode=$1-b$2-p${NPROC:-1} sec=$SEC skip=$SKIP
  local flag=(--batch-size "$batch")
  [ "$m" = no-prefetch ] && flag+=(--no-prefetch)
  # compiled: 300 s unless SEC_COMPILE says otherwise. Until a steady step is timed the trainer gives the next step the
  # first (compiling) step's time, which took 90 s at batch 64 on a cold H100 (session 23): a 140-s window stopped
  # after that one step
  [ "$m" = compile ] && { flag+=(--compile); sec=${SEC_COMPILE:-300}; skip=${SKIP_COMPILE:-$SKIP}; }
  rm -rf /root/tp/$mode; mkdir -p /root/tp/$mode
  CUDA_VISIBLE_DEVICES=$gpu $LAUNCH -m benchmarks.train_d2l --base /root/stage --gguf smol.gguf --tasks "$MIX" --skip-wrong-teacher \
      --init d2l_integrations/checkpoints/smollm2-135m-instruct --data-seed 12 --minutes "$(python3 -c "print($sec/60)")" \
      "${TA[@]}" "${flag[@]}" --work /root/tp/$mode/work --out /root/tp/$mode/out > /root/tp/$mode/stdout.txt 2>&1
  python3 - "$mode" "$skip" <<'PY'
import json, sys
mode, skip = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(f"/root/tp/{mode}/work/log.jsonl") if '"tok_per_s"' in l]
rows = [r for r in rows if r["step"] > skip]
mean = lambda k: sum(r[k] for r in rows) / max(1, len(rows))
print(json.dumps({"mode": mode, "logged_steps": len(rows), "last_step": rows[-1]["step"] if rows else None,
                  **{k: round(mean(k), 4) for k in ("tok_per_s", "s_per_step", "s_data", "s_teacher", "s_student")}}))
PY
  grep -m1 "base loaded" /root/tp/$mode/stdout.txt; grep "trained_to_step" /root/tp/$mode/stdout.txt
  grep -m3 -i "error\|recompil" /root/tp/$mode/stdout.txt | cut -c1-300
}
# runs side by side would convert the GGUF into one cache folder at once and read each other's half-written files
# (session 19), and ranks of one process group each convert it too: convert it once first
{ [ "${PARALLEL:-0}" = 1 ] || [ "${NPROC:-1}" -gt 1 ]; } && python3 -c "from d2l_integrations.engine.base_model import load_base_model as m; m('/root/stage', device='cuda', gguf_file='smol.gguf')" 2>&1 | grep -v "^Converting" | tail -n 2
for batch in $BATCHES; do
  i=0
  for m in ${MODES:-prefetch no-prefetch}; do
    if [ "${PARALLEL:-0}" = 1 ]; then run_mode "$m" "$batch" "$((i + ${GPU0:-0}))" > /root/tp/out.$m.$batch 2>&1 & else run_mode "$m" "$batch" 0; fi
    i=$((i + 1))
  done
  if [ "${PARALLEL:-0}" = 1 ]; then wait; cat /root/tp/out.*.$batch; fi
done
nvidia-smi --query-gpu=name --format=csv,noheader
