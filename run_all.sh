#!/usr/bin/env bash
# Reproduce the paper's tables: for each attack, the numbered steps of the paper-readme in order
# (clean model for CL, withTrans backdoored model, SD steps 1-5, D-BR, D-ST), then the report.
#
#   bash run_all.sh [--quick | --full_w16] [--attacks "badnets blend" | all] [--dataset cifar10] [--data_file F.npz|F.tar.gz|DIR]
#                   [--device auto|cpu|cuda] [--save_root DIR] [--epoch_scale X] [--st_epochs N] [--seed N]
#                   [--results_dir results] [--skip_dst]
#
# --quick: CPU scale (ResNet-18 --width 16, epochs scaled as README.md explains), on the synthetic
#          dataset unless --data_file is given; attacks BadNets and Blend-Strip unless --attacks.
# --full_w16: the paper's SD and D-BR on the full CIFAR-10 (--data_file cifar10_jpeg.tar.gz) at CPU
#          scale: only the victim is scaled (width 16, 20 withTrans epochs, lr x 0.1 at 10 and 15).
# --skip_dst: stop each attack after D-BR (the D-ST columns of the report stay empty).
# A step whose output is complete is skipped (an interrupted run resumes); the first failing step
# stops the run and names its log.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

QUICK=0; RECIPE=paper; ATTACKS=""; DATASET=""; DATA_FILE=""; DEVICE=auto; SAVE_ROOT=./saved; SCALE=1; ST_EPOCHS=""; RESULTS_DIR=results
SEED=""; SKIP_DST=0
die() { echo "run_all.sh: $* (see --help)" >&2; exit 2; }
# value FLAG ARGS...: the value after FLAG, refused when missing or when it is the next flag
value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; printf '%s' "$2"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; RECIPE=quick ;;
    --full_w16) RECIPE=full_w16 ;;
    --attacks) ATTACKS=$(value "$@") || exit 2; shift ;;
    --dataset) DATASET=$(value "$@") || exit 2; shift ;;
    --data_file) DATA_FILE=$(value "$@") || exit 2; shift ;;
    --device) DEVICE=$(value "$@") || exit 2; shift ;;
    --save_root) SAVE_ROOT=$(value "$@") || exit 2; shift ;;
    --epoch_scale) SCALE=$(value "$@") || exit 2; shift ;;   # multiplies every epoch count (tests use a tiny value)
    --st_epochs) ST_EPOCHS=$(value "$@") || exit 2; shift ;; # D-ST extractor epochs (default: quick 30, full 200)
    --results_dir) RESULTS_DIR=$(value "$@") || exit 2; shift ;;
    --seed) SEED=$(value "$@") || exit 2; shift ;;           # poisoned set and training seed (default: the scripts' 1000)
    --skip_dst) SKIP_DST=1 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#'; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
[[ "$SCALE" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ ! "$SCALE" =~ ^[0.]+([eE].*)?$ ]] \
  || die "--epoch_scale must be a positive number, got '$SCALE'"
[ -z "$ST_EPOCHS" ] || [[ "$ST_EPOCHS" =~ ^0*[1-9][0-9]*$ ]] || die "--st_epochs must be a positive integer, got '$ST_EPOCHS'"
[ -z "$SEED" ] || [[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be an integer >= 0, got '$SEED'"
case "$DEVICE" in auto|cpu|cuda) ;; *) die "--device must be auto, cpu or cuda, got '$DEVICE'" ;; esac
[ -z "$DATA_FILE" ] || [ -e "$DATA_FILE" ] || die "--data_file $DATA_FILE does not exist"

# the attack table lives in one place, utils/args.py (PAPER_ATTACKS): read it, do not copy it
declare -A TARGET TRIGGER
TABLE=$($PY -c 'from utils.args import PAPER_ATTACKS as P
for k, (target, trigger, _) in P.items(): print(f"TARGET[{k}]={target}; TRIGGER[{k}]={trigger}")
print("ALL=\"" + " ".join(P) + "\"")') || {
  echo "run_all.sh: cannot read the attack table from utils/args.py with '$PY' (is the environment installed? see README.md)" >&2
  exit 2
}
eval "$TABLE"

if [ "$QUICK" = 1 ]; then
  : "${ATTACKS:=badnets blend}"
  if [ -z "$DATASET" ]; then if [ -n "$DATA_FILE" ]; then DATASET=cifar10; else DATASET=synthetic; fi; fi
  WIDTH=16
  # CPU scale: the subset has ~1/10 of CIFAR-10, so short runs get ~10x the epochs (same SGD steps)
  E_NOTRANS=20; E_FT=10; E_WITH=40; SCHED_WITH="20 30"; E_CLEAN=40
  # the best CPU-scale settings measured so far (BENCHMARKS.md): opt-in, beyond the paper
  SD_FLAGS="--fct_draws 4 --trans1 flip --trans2 crop"; SPLIT=(--clean_ratio 0.5 --poison_ratio 0.05)
  E_DBR=20; DBR_FLAGS="--lr 1e-3 --ascent_bound 4.6 --lr_schedule cosine --relearn_stamp 0.5 --stamp_jitter 0.5 --balance_classes"
  ST_FLAGS="--epochs 30"; E_CLS=10; CLS_FLAGS="--balance_classes --normalize_features --cosine"
else
  : "${ATTACKS:=$ALL}"
  : "${DATASET:=cifar10}"
  WIDTH=64
  E_NOTRANS=2; E_FT=10; E_WITH=200; SCHED_WITH="100 150"; E_CLEAN=200
  # full_w16: what 2 CPU cores cannot afford at 50,000 images is the victim's width and epochs
  [ "$RECIPE" = full_w16 ] && { WIDTH=16; E_WITH=20; SCHED_WITH="10 15"; E_CLEAN=20; }
  SD_FLAGS=""; SPLIT=(--clean_ratio 0.2 --poison_ratio 0.05)
  E_DBR=20; DBR_FLAGS="--lr 1e-4"
  ST_FLAGS="--epochs 200"; E_CLS=10; CLS_FLAGS=""
fi
[ "$ATTACKS" = all ] && ATTACKS=$ALL
for attack in $ATTACKS; do
  [ -n "${TRIGGER[$attack]:-}" ] || die "unknown attack '$attack' (choose from: $ALL)"
done
$PY -c 'import sys; from utils.args import DATASETS; sys.exit(sys.argv[1] not in DATASETS)' "$DATASET" \
  || die "unknown --dataset '$DATASET'"
[ -n "$ST_EPOCHS" ] && ST_FLAGS="--epochs $ST_EPOCHS"

# fingerprint of each attack's trigger file (utils/triggers.py), kept in the .done markers below
declare -A ASSET
eval "$($PY -c 'import sys, types
from utils.args import PAPER_ATTACKS as P
from utils.triggers import asset_fingerprint
for k, (_, trigger, _) in P.items():
    a = types.SimpleNamespace(trigger_type=trigger, dataset=sys.argv[1], blend_image=None, ssba_encoder=None)
    print(f"ASSET[{k}]={asset_fingerprint(a)}")' "$DATASET")"

scale() { $PY -c "import math,sys; print(max(1, math.ceil($1 * float(sys.argv[1]))))" "$SCALE"; }
E_NOTRANS=$(scale $E_NOTRANS); E_FT=$(scale $E_FT); E_WITH=$(scale $E_WITH); E_CLEAN=$(scale $E_CLEAN); E_CLS=$(scale $E_CLS); E_DBR=$(scale $E_DBR)

COMMON=(--dataset "$DATASET" --width "$WIDTH" --device "$DEVICE" --save_root "$SAVE_ROOT")
[ -n "$DATA_FILE" ] && COMMON+=(--data_file "$(realpath "$DATA_FILE")")
[ -n "$SEED" ] && COMMON+=(--seed "$SEED")
DATA_NAME=$(basename "${DATA_FILE:-x}"); for suffix in .npz .tar.gz .tgz .tar; do DATA_NAME=${DATA_NAME%"$suffix"}; done
TAG=$DATASET${DATA_FILE:+-$DATA_NAME}${SEED:+-seed$SEED}
RUN_DIR=$SAVE_ROOT/run_all/$TAG; [ "$RECIPE" = paper ] || RUN_DIR+=_$RECIPE
mkdir -p "$SAVE_ROOT" 2>/dev/null && [ -w "$SAVE_ROOT" ] || die "--save_root $SAVE_ROOT cannot be created or written"
# one run_all.sh per save root: the lock (flock) goes with the process that holds it, however it ends
exec 9<>"$SAVE_ROOT/.run_all.lock"
if ! flock -n 9; then
  echo "run_all.sh: $SAVE_ROOT is in use by another run_all.sh (process $(head -c 64 "$SAVE_ROOT/.run_all.lock" | tr -d '\n')); wait for it or stop it" >&2
  exit 2
fi
echo "$$" > "$SAVE_ROOT/.run_all.lock"
mkdir -p "$RUN_DIR"

# step NAME ATTACK COMMAND...: run unless done; log to $RUN_DIR/ATTACK/NAME.log; time into times.csv
step() {
  local name=$1 attack=$2; shift 2
  local dir=$RUN_DIR/$attack; mkdir -p "$dir"
  if [ -f "$dir/$name.done" ]; then
    # the .done marker holds the trigger file's fingerprint (empty: a marker from before it was recorded)
    local made; made=$(cat "$dir/$name.done")
    if [ -n "$made" ] && [ "$made" != "${ASSET[$attack]}" ]; then
      echo "run_all.sh: step '$name' of attack '$attack' was made with another trigger file (fingerprint $made, now ${ASSET[$attack]:-none});" \
           "move $dir and the attack's outputs under $SAVE_ROOT away, or use another --save_root" >&2
      exit 2
    fi
    echo "  [skip] $attack $name (done)"; return 0
  fi
  echo "  [run]  $attack $name"
  local t0; t0=$(date +%s.%N)
  if ! "$@" > "$dir/$name.log" 2>&1; then
    echo "run_all.sh: step '$name' of attack '$attack' failed; see $dir/$name.log" >&2
    tail -n 5 "$dir/$name.log" >&2
    exit 1
  fi
  local secs; secs=$($PY -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
  # one row per step: a step rerun after a kill (time written, marker not yet) replaces its row
  { grep -v "^$attack,$name," "$RUN_DIR/times.csv" 2>/dev/null || true; echo "$attack,$name,$secs"; } > "$RUN_DIR/times.csv.tmp"
  mv "$RUN_DIR/times.csv.tmp" "$RUN_DIR/times.csv"
  printf '%s' "${ASSET[$attack]}" > "$dir/$name.done"
}

for attack in $ATTACKS; do
  A=("${COMMON[@]}" --target_type "${TARGET[$attack]}" --trigger_type "${TRIGGER[$attack]}")
  echo "== $attack (${TRIGGER[$attack]}, ${TARGET[$attack]})"
  if [ "$attack" = cl ]; then
    step clean_model "$attack" $PY train_clean_withTrans.py "${COMMON[@]}" --epochs "$E_CLEAN" --schedule $SCHED_WITH --overwrite
  fi
  step withTrans "$attack" $PY train_attack_withTrans.py "${A[@]}" --epochs "$E_WITH" --schedule $SCHED_WITH --overwrite
  step sd1_noTrans "$attack" $PY train_attack_noTrans.py "${A[@]}" --epochs "$E_NOTRANS" --overwrite
  step sd2_finetune "$attack" $PY finetune_attack_noTrans.py "${A[@]}" --epochs "$E_FT" --overwrite
  step sd3_fct "$attack" $PY calculate_consistency.py "${A[@]}" $SD_FLAGS
  step sd3_plot "$attack" $PY visualize_consistency.py "${A[@]}"
  step sd4_gamma "$attack" $PY calculate_gamma.py "${A[@]}" "${SPLIT[@]}"
  step sd5_split "$attack" $PY separate_samples.py "${A[@]}" "${SPLIT[@]}" $SD_FLAGS
  step dbr "$attack" $PY unlearn_relearn.py "${A[@]}" "${SPLIT[@]}" --epochs "$E_DBR" $DBR_FLAGS --overwrite
  [ "$SKIP_DST" = 1 ] && continue
  step dst_extractor "$attack" $PY ST/train_extractor.py "${A[@]}" "${SPLIT[@]}" $ST_FLAGS --overwrite
  step dst_classifier "$attack" $PY ST/train_classifier.py "${A[@]}" "${SPLIT[@]}" --epochs "$E_CLS" \
      $CLS_FLAGS --overwrite
  step dst_test "$attack" $PY ST/test.py "${A[@]}" "${SPLIT[@]}" $CLS_FLAGS
done

$PY report_results.py "${COMMON[@]}" "${SPLIT[@]}" --attacks $ATTACKS --times "$RUN_DIR/times.csv" --out_dir "$RESULTS_DIR" \
    --name "$DATASET${SEED:+_seed$SEED}$(case $RECIPE in quick) ;; paper) echo _full ;; *) echo "_$RECIPE" ;; esac)"
