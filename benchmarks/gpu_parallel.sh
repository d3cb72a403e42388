#!/usr/bin/env bash
# The lent-GPU check as one script: training throughput at full width (alone on the GPU), then the
# CPU-scale reproduction of every attack as parallel processes. Width-16 models leave a large GPU
# mostly idle (each process is bound by kernel launches), so N chains side by side finish in far
# less than N times one chain.
#
#   bash benchmarks/gpu_parallel.sh DATA_FILE DEADLINE_SECONDS [EPOCH_SCALE] [DEVICE]
#
# Jobs (each logs to $OUT/logs/<job>.log):
#   attack_<a>    run_all.sh --quick for attack <a> (D-ST extractor: 45 epochs, what the CPU's
#                 15-minute budget gives), then the D-BR variants of $DBR_VARIANTS on the same split
#                 (dbr_study/<a>/<tag>.csv)
#   parity64      BadNets at full width: 200 withTrans epochs, SD chain, faithful D-BR (20 and 200 epochs)
#   dst64         D-ST with the paper's recipe at full width (200 extractor epochs) on the width-16 split
#   undef_<a>     the undefended D-ST baseline (plain SupCon + CE on the whole poisoned set)
#   seed_<s>_<a>  run_all.sh --quick with --seed <s> for each attack of $SEED_ATTACKS (default BadNets):
#                 the spread over seeds
#   strong_*      longer or wider backdoored models for the attacks that are not learned in 40 epochs
# SKIP_DST=1 passes --skip_dst to every run_all.sh; DBR_VARIANTS names the D-BR variants of attack_<a>.
# At most $MAXJOBS run at once, started in the order above.
# At the deadline every job still running is stopped; the reports of what finished are written and
# the logs, CSVs and reports (no checkpoints) are packed into $OUT/results.tgz.
set -uo pipefail
DATA=$(realpath "${1:-gpu_data/cifar10_subset.npz}"); DEADLINE=${2:-480}; SCALE=${3:-1}; DEVICE=${4:-cuda}
OUT=$(realpath -m "${OUT:-./gpu_out}"); mkdir -p "$OUT/logs"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # ST/ scripts import utils/ without an installed package
PY=${PYTHON:-python3}; export PYTHON=$PY
SR=./saved/gpu
ST_ROOT=(--st_root "$(realpath -m "$SR")/ST_save")   # where run_all.sh puts D-ST outputs for this --save_root
T0=$(date +%s)
ATTACKS=${ATTACKS-badnets badnets_all2all trojan blend kitty sig cl}   # job lists: override for a smoke test
SEEDS=${SEEDS-1001 1002}; UNDEF=${UNDEF-badnets trojan blend kitty}
STRONG=${STRONG-kitty:80:16 badnets_all2all:80:16 badnets_all2all:60:32 kitty:60:32}
MAXJOBS=${MAXJOBS:-12}; EXTRA=${EXTRA-parity64 dst64}
set -m   # each background job in its own process group, so the deadline can stop it whole
e() { $PY -c "import math,sys; print(max(1, math.ceil($1 * float(sys.argv[1]))))" "$SCALE"; }
flags() { $PY -c "import sys; from utils.args import PAPER_ATTACKS as P; t = P[sys.argv[1]]; print('--target_type', t[0], '--trigger_type', t[1])" "$1"; }
# common ATTACK [SAVE_ROOT]: the flags every step of ATTACK's jobs shares, set into the caller's local array C
common() { C=(--dataset cifar10 --data_file "$DATA" --device "$DEVICE" --save_root "${2:-$SR}" $(flags "$1")); }

if [ "$DEVICE" = cuda ] && [ -z "${SKIP_SPEED:-}" ]; then
  {
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    timeout 150 $PY -m benchmarks.throughput --data_file "$DATA" --dataset cifar10 --width 64 --device cuda --epochs 3
    timeout 90 $PY -m benchmarks.throughput --data_file "$DATA" --dataset cifar10 --width 16 --device cuda --epochs 3
  } > "$OUT/speed.txt" 2>&1
fi
echo "speed done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"

QUICK=(--quick --data_file "$DATA" --device "$DEVICE" --save_root "$SR" --st_epochs "$(e 45)" --epoch_scale "$SCALE")
[ -n "${SKIP_DST:-}" ] && QUICK+=(--skip_dst)
# D-BR variants run on each attack's split after its quick chain: "tag:flags;tag:flags" (alpha_c 0.5, alpha_p 0.05)
B="--ascent_bound 4.6 --lr_schedule cosine"
# (each runs --epochs 60 unless its flags name another count; run_all.sh's own D-BR is the quick setting)
DBR_VARIANTS=${DBR_VARIANTS-"no_stamp:--lr 3e-3 $B;stamp_e20:--epochs $(e 20) --lr 1e-3 $B --relearn_stamp 0.5 --balance_classes;stamp_jitter_e60:--lr 1e-3 $B --relearn_stamp 0.5 --stamp_jitter 0.5 --balance_classes"}

attack_job() {
  local a=$1
  bash run_all.sh "${QUICK[@]}" --attacks "$a" --results_dir "$OUT/results_$a" || return 1
  local C; common "$a"; C+=(--width 16 --clean_ratio 0.5 --poison_ratio 0.05)
  local D=$SR/dbr_study/$a spec tag
  IFS=';' read -ra specs <<< "$DBR_VARIANTS"
  for spec in "${specs[@]}"; do
    tag=${spec%%:*}
    # shellcheck disable=SC2086  # the flags are meant to split
    $PY unlearn_relearn.py "${C[@]}" --epochs "$(e 60)" ${spec#*:} --checkpoint_save "$D/$tag.tar" --log "$D/$tag.csv" \
        --overwrite > "$OUT/logs/dbr_${a}_$tag.log" 2>&1
  done
}

seed_job() {  # seed attack
  bash run_all.sh "${QUICK[@]}" --attacks "$2" --seed "$1" --results_dir "$OUT/results_seed$1_$2"
}

undef_job() {
  local a=$1
  local C; common "$a"; C+=(--width 16 "${ST_ROOT[@]}" --clean_ratio 0.5 --poison_ratio 0.05 --undefended)
  $PY ST/train_extractor.py "${C[@]}" --epochs "$(e 45)" --overwrite &&
  $PY ST/train_classifier.py "${C[@]}" --epochs "$(e 10)" --overwrite &&
  $PY ST/test.py "${C[@]}"
}

strong_job() {  # attack epochs width
  local a=$1 n=$2 w=$3 C; common "$a" "$SR/strong_e${n}_w${w}"
  $PY train_attack_withTrans.py "${C[@]}" --width "$w" --epochs "$(e "$n")" \
      --schedule "$(e $((n / 2)))" "$(e $((n * 3 / 4)))" --overwrite
}

parity64_job() {
  local C; common badnets; C+=(--width 64)
  $PY train_attack_withTrans.py "${C[@]}" --epochs "$(e 200)" --schedule "$(e 100)" "$(e 150)" --overwrite &&
  $PY train_attack_noTrans.py "${C[@]}" --epochs "$(e 20)" --overwrite &&
  $PY finetune_attack_noTrans.py "${C[@]}" --epochs "$(e 10)" --overwrite &&
  $PY calculate_consistency.py "${C[@]}" && $PY calculate_gamma.py "${C[@]}" && $PY separate_samples.py "${C[@]}" &&
  $PY unlearn_relearn.py "${C[@]}" --epochs "$(e 20)" --overwrite &&
  $PY unlearn_relearn.py "${C[@]}" --epochs "$(e 200)" --checkpoint_save "$SR/dbr_study/parity64/e200.tar" \
      --log "$SR/dbr_study/parity64/e200.csv" --overwrite
}

dst64_job() {  # waits for the width-16 FCT values of the BadNets quick chain
  local C; common badnets
  until [ -f "$SR/run_all/cifar10-$(basename "${DATA%.npz}")_quick/badnets/sd3_fct.done" ]; do sleep 5; done
  local ST=("${C[@]}" "${ST_ROOT[@]}" --width 64 --sd_width 16)
  $PY separate_samples.py "${C[@]}" --width 16 --fct_draws 4 &&   # the paper's alpha_c 0.2, alpha_p 0.05
  $PY ST/train_extractor.py "${ST[@]}" --epochs "$(e 200)" --overwrite &&
  $PY ST/train_classifier.py "${ST[@]}" --epochs "$(e 10)" --overwrite &&
  $PY ST/test.py "${ST[@]}"
}

PIDS=()
alive() { local n=0 p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
job() {
  local name=$1; shift
  while [ "$(alive)" -ge "$MAXJOBS" ] && [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ]; do sleep 2; done
  [ $(( $(date +%s) - T0 )) -ge "$DEADLINE" ] && return 0
  ( "$@" ) > "$OUT/logs/$name.log" 2>&1 & PIDS+=($!); echo "$name $!" >> "$OUT/jobs.txt"
  echo "start $name at $(( $(date +%s) - T0 )) s" >> "$OUT/timeline.txt"
}
for a in $ATTACKS; do job "attack_$a" attack_job "$a"; done
for x in $EXTRA; do job "$x" "${x}_job"; done
for a in $UNDEF; do job "undef_$a" undef_job "$a"; done
for s in $SEEDS; do for a in ${SEED_ATTACKS:-badnets}; do job "seed_${s}_$a" seed_job "$s" "$a"; done; done
for spec in $STRONG; do IFS=: read -r a n w <<< "$spec"; job "strong_${a}_e${n}_w${w}" strong_job "$a" "$n" "$w"; done

while [ $(( $(date +%s) - T0 )) -lt "$DEADLINE" ] && [ "$(alive)" -gt 0 ]; do sleep 5; done
echo "jobs stopped at $(( $(date +%s) - T0 )) s; still running: $(for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && grep " $p\$" "$OUT/jobs.txt" | cut -d' ' -f1; done | tr '\n' ' ')" | tee -a "$OUT/timeline.txt"
for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
sleep 3
for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done

# the report of every attack whose steps finished (missing ones show as empty cells)
[ -n "$ATTACKS" ] && $PY report_results.py --dataset cifar10 --data_file "$DATA" --width 16 --save_root "$SR" "${ST_ROOT[@]}" --clean_ratio 0.5 \
    --poison_ratio 0.05 --attacks $ATTACKS --times "$SR/run_all/cifar10-$(basename "${DATA%.npz}")_quick/times.csv" \
    --out_dir "$OUT/results" --name cifar10 > "$OUT/logs/report.log" 2>&1
# one archive (the device tool brings back only a few files): the run's outputs without checkpoints and
# arrays, and the per-job reports and logs under $OUT
tar czf "$OUT/results.tgz" --exclude='*.tar' --exclude='*.pth' --exclude='*_samples.npy' --exclude='*.npy' \
    "$SR" -C "$OUT" $(cd "$OUT" && ls -d results* logs 2>/dev/null | grep -v '^results.tgz$') 2>/dev/null
echo "packed at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
ls -la "$OUT"
