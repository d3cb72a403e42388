#!/usr/bin/env bash
# Reproduce the paper's tables: for each attack, the numbered steps of the paper-readme in order
# (clean model for CL, withTrans backdoored model, SD steps 1-5, D-BR, D-ST), then the report.
#
#   bash run_all.sh [--recipe paper|quick|full_w16|full_w16_threshold|full_w16_nofinetune] [--attacks "badnets blend" | all] [--dataset cifar10]
#                   [--data_file F.npz|F.tar.gz|DIR] [--device auto|cpu|cuda] [--save_root DIR]
#                   [--epoch_scale X] [--st_epochs N] [--seed N] [--results_dir results] [--skip_dst | --skip_dbr]
#                   [--jobs_per_gpu K] [--gpus "0 1 ..."]
#
# --recipe: the named settings of utils/recipes.py, passed to every step as --recipe (default paper):
#          paper     the paper's settings (width 64, every attack, CIFAR-10);
#          full_w16  the paper's SD and D-BR on the full CIFAR-10 (--data_file cifar10_jpeg.tar.gz) with a
#                    width-16, 20-epoch victim;
#          full_w16_threshold  full_w16 with the original code's split rule (--split_rule threshold); give
#                    it its own --save_root (separate_samples.py refuses to replace a full_w16 split);
#          full_w16_nofinetune  full_w16 with FCT by the noTrans model (no SD step 2, the L_intra
#                    fine-tuning); its own --save_root as well;
#          quick     CPU scale with the opt-ins beyond the paper, on the synthetic dataset unless
#                    --data_file is given; attacks BadNets and Blend-Strip unless --attacks.
#          --quick and --full_w16 are short for --recipe quick and --recipe full_w16.
# --epoch_scale X: multiplies every epoch count (tests use a tiny value); --st_epochs N: D-ST extractor epochs.
# --skip_dst: stop each attack after D-BR (the D-ST columns of the report stay empty).
# --skip_dbr: D-ST alone, which needs no backdoored model: no withTrans victim and no D-BR (the BD and D-BR
#          columns stay empty); the SD steps and D-ST run as without it.
# --jobs_per_gpu K: run K attacks at a time, each chain as its own process: K per GPU of --gpus (each job
#          sees one GPU), or, without --gpus, K side by side on the CPU with one torch thread each.
# A step whose output is complete is skipped (an interrupted run resumes); the first failing step
# stops its attack and names its log. One line per step says its place (i/N), its time, the elapsed
# time and an estimate of what is left; each step's own output is in its log.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

RECIPE=paper; ATTACKS=""; DATASET=""; DATA_FILE=""; DEVICE=auto; SAVE_ROOT=./saved; SCALE=1; ST_EPOCHS=""
RESULTS_DIR=results; SEED=""; SKIP_DST=0; SKIP_DBR=0; JOBS=1; GPUS=""
die() { echo "run_all.sh: $* (see --help)" >&2; exit 2; }
# value FLAG ARGS...: the value after FLAG, refused when missing or when it is the next flag
value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; printf '%s' "$2"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --recipe) RECIPE=$(value "$@") || exit 2; shift ;;
    --quick) RECIPE=quick ;;
    --full_w16) RECIPE=full_w16 ;;
    --attacks) ATTACKS=$(value "$@") || exit 2; shift ;;
    --dataset) DATASET=$(value "$@") || exit 2; shift ;;
    --data_file) DATA_FILE=$(value "$@") || exit 2; shift ;;
    --device) DEVICE=$(value "$@") || exit 2; shift ;;
    --save_root) SAVE_ROOT=$(value "$@") || exit 2; shift ;;
    --epoch_scale) SCALE=$(value "$@") || exit 2; shift ;;
    --st_epochs) ST_EPOCHS=$(value "$@") || exit 2; shift ;;
    --results_dir) RESULTS_DIR=$(value "$@") || exit 2; shift ;;
    --seed) SEED=$(value "$@") || exit 2; shift ;;           # poisoned set and training seed (default: the scripts' 1000)
    --skip_dst) SKIP_DST=1 ;;
    --skip_dbr) SKIP_DBR=1 ;;
    --jobs_per_gpu) JOBS=$(value "$@") || exit 2; shift ;;
    --gpus) GPUS=$(value "$@") || exit 2; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#'; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
[[ "$SCALE" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ ! "$SCALE" =~ ^[0.]+([eE].*)?$ ]] \
  || die "--epoch_scale must be a positive number, got '$SCALE'"
[ -z "$ST_EPOCHS" ] || [[ "$ST_EPOCHS" =~ ^0*[1-9][0-9]*$ ]] || die "--st_epochs must be a positive integer, got '$ST_EPOCHS'"
[ -z "$SEED" ] || [[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be an integer >= 0, got '$SEED'"
[[ "$JOBS" =~ ^0*[1-9][0-9]*$ ]] || die "--jobs_per_gpu must be a positive integer, got '$JOBS'"
[ -z "$GPUS" ] || [[ "$GPUS" =~ ^[0-9]+( +[0-9]+)*$ ]] || die "--gpus must be GPU numbers separated by spaces, got '$GPUS'"
case "$DEVICE" in auto|cpu|cuda) ;; *) die "--device must be auto, cpu or cuda, got '$DEVICE'" ;; esac
[ -n "$GPUS" ] && [ "$DEVICE" = cpu ] && die "--gpus asks for GPUs, but --device is cpu"
[ "$SKIP_DST$SKIP_DBR" = 11 ] && die "--skip_dst and --skip_dbr together leave no defense to run"
[ -z "$DATA_FILE" ] || [ -e "$DATA_FILE" ] || die "--data_file $DATA_FILE does not exist"

# the attack table (utils/args.py) and the recipe (utils/recipes.py) live in one place each: read them
declare -A TARGET TRIGGER EPOCHS
SETTINGS=$($PY -c 'import sys
from utils.args import PAPER_ATTACKS as P
from utils.recipes import RECIPES, shell
for k, (target, trigger, _) in P.items(): print(f"TARGET[{k}]={target}; TRIGGER[{k}]={trigger}")
print("ALL=\"" + " ".join(P) + "\"")
print(shell(sys.argv[1], float(sys.argv[2])) if sys.argv[1] in RECIPES else "RECIPES=\"" + " ".join(RECIPES) + "\"")' \
  "$RECIPE" "$SCALE") || {
  echo "run_all.sh: cannot read the settings from utils/ with '$PY' (is the environment installed? see README.md)" >&2
  exit 2
}
RECIPES=""; eval "$SETTINGS"
[ -z "$RECIPES" ] || die "unknown --recipe '$RECIPE' (choose from: $RECIPES)"
: "${ATTACKS:=$RECIPE_ATTACKS}"
[ "$ATTACKS" = all ] && ATTACKS=$ALL
for attack in $ATTACKS; do
  [ -n "${TRIGGER[$attack]:-}" ] || die "unknown attack '$attack' (choose from: $ALL)"
done
# the recipe's dataset (quick: the synthetic set), or CIFAR-10 for a --data_file
if [ -z "$DATASET" ]; then if [ -n "$DATA_FILE" ]; then DATASET=cifar10; else DATASET=$RECIPE_DATASET; fi; fi
$PY -c 'import sys; from utils.args import DATASETS; sys.exit(sys.argv[1] not in DATASETS)' "$DATASET" \
  || die "unknown --dataset '$DATASET'"
[ -n "$ST_EPOCHS" ] && EPOCHS[st_extractor]=$ST_EPOCHS
# --epochs only where --epoch_scale or --st_epochs changed the recipe's count
epochs() { [ -z "${EPOCHS[$1]}" ] || echo "--epochs ${EPOCHS[$1]}"; }

# fingerprint of each attack's trigger file (utils/triggers.py), kept in the .done markers below
declare -A ASSET
eval "$($PY -c 'import sys, types
from utils.args import PAPER_ATTACKS as P
from utils.triggers import asset_fingerprint
for k, (_, trigger, _) in P.items():
    a = types.SimpleNamespace(trigger_type=trigger, dataset=sys.argv[1], blend_image=None, ssba_encoder=None)
    print(f"ASSET[{k}]={asset_fingerprint(a)}")' "$DATASET")"

COMMON=(--recipe "$RECIPE" --dataset "$DATASET" --device "$DEVICE" --save_root "$SAVE_ROOT")
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

# steps ATTACK: the names of ATTACK's steps, in order
steps() {
  [ "$1" = cl ] && echo clean_model
  [ "$SKIP_DBR" = 1 ] || echo withTrans
  echo sd1_noTrans
  [ "$SD_MODEL" = noTrans ] || echo sd2_finetune   # the recipe's FCT uses the noTrans model: no SD step 2
  echo sd3_fct sd3_plot sd4_gamma sd5_split
  [ "$SKIP_DBR" = 1 ] || echo dbr
  [ "$SKIP_DST" = 1 ] || echo dst_extractor dst_classifier dst_test
}
PLAN=$RUN_DIR/.plan; PROGRESS=$RUN_DIR/.progress; T0=$(date +%s)
for attack in $ATTACKS; do for name in $(steps "$attack"); do echo "$attack,$name"; done; done > "$PLAN"
: > "$PROGRESS"
# what the run has done (i of N), the elapsed time and what is left: each step not done yet is
# estimated by the mean time of the done steps of its name, else of all done steps; K jobs share it
report_progress() {
  local attack=$1 name=$2 secs=$3 ran=$4
  flock "$PROGRESS" -c "echo '$attack,$name,$secs,$ran' >> '$PROGRESS'"
  awk -F, -v now="$(date +%s)" -v t0="$T0" -v jobs="$NJOBS" -v attack="$attack" -v name="$name" \
      -v secs="$secs" -v ran="$ran" '
    function clock(s) { s = int(s + 0.5); return s >= 3600 ? sprintf("%dh%02dm", s / 3600, (s % 3600) / 60) \
                                                           : sprintf("%dm%02ds", s / 60, s % 60) }
    FNR == NR { done[$1 "," $2] = 1; if ($4) { sum[$2] += $3; cnt[$2]++; all += $3; n++ }; k++; next }
    !(($1 "," $2) in done) { left += ($2 in cnt) ? sum[$2] / cnt[$2] : (n ? all / n : 0); unknown += !n }
    { total++ }
    END {
      took = ran ? sprintf("%.1f s", secs) : "done before"
      eta = k == total ? "all steps done" : unknown ? "left unknown" : sprintf("about %s left", clock(left / jobs))
      printf "  [%d/%d] %s %s: %s; elapsed %s, %s\n", k, total, attack, name, took, clock(now - t0), eta
    }' "$PROGRESS" "$PLAN"
}

# step NAME ATTACK COMMAND...: run unless done; log to $RUN_DIR/ATTACK/NAME.log; time into times.csv
step() {
  local name=$1 attack=$2; shift 2
  local dir=$RUN_DIR/$attack; mkdir -p "$dir"
  if [ -f "$dir/$name.done" ]; then
    # the .done marker holds the trigger file's fingerprint (empty: a trigger drawn in code)
    local made; made=$(cat "$dir/$name.done")
    if [ -n "$made" ] && [ "$made" != "${ASSET[$attack]}" ]; then
      echo "run_all.sh: step '$name' of attack '$attack' was made with another trigger file (fingerprint $made, now ${ASSET[$attack]:-none});" \
           "move $dir and the attack's outputs under $SAVE_ROOT away, or use another --save_root" >&2
      return 2
    fi
    echo "  [skip] $attack $name (done)"
    report_progress "$attack" "$name" 0 0
    return 0
  fi
  echo "  [run]  $attack $name (log: $dir/$name.log)"
  local t0; t0=$(date +%s.%N)
  if ! "$@" > "$dir/$name.log" 2>&1; then
    echo "run_all.sh: step '$name' of attack '$attack' failed; see $dir/$name.log" >&2
    tail -n 5 "$dir/$name.log" >&2
    return 1
  fi
  local secs; secs=$($PY -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
  # one row per step: a step rerun after a kill (time written, marker not yet) replaces its row
  flock "$RUN_DIR/times.csv.lock" -c "{ grep -v '^$attack,$name,' '$RUN_DIR/times.csv' 2>/dev/null || true; \
    echo '$attack,$name,$secs'; } > '$RUN_DIR/times.csv.tmp' && mv '$RUN_DIR/times.csv.tmp' '$RUN_DIR/times.csv'"
  printf '%s' "${ASSET[$attack]}" > "$dir/$name.done"
  report_progress "$attack" "$name" "$secs" 1
}

# chain ATTACK: every step of one attack, in the paper-readme's order
chain() {
  local attack=$1
  local A=("${COMMON[@]}" --target_type "${TARGET[$attack]}" --trigger_type "${TRIGGER[$attack]}")
  echo "== $attack (${TRIGGER[$attack]}, ${TARGET[$attack]})"
  if [ "$attack" = cl ]; then
    step clean_model "$attack" $PY train_clean_withTrans.py "${COMMON[@]}" $(epochs clean_model) --overwrite || return
  fi
  if [ "$SKIP_DBR" != 1 ]; then
    step withTrans "$attack" $PY train_attack_withTrans.py "${A[@]}" $(epochs withTrans) --overwrite || return
  fi
  step sd1_noTrans "$attack" $PY train_attack_noTrans.py "${A[@]}" $(epochs noTrans) --overwrite || return
  if [ "$SD_MODEL" != noTrans ]; then
    step sd2_finetune "$attack" $PY finetune_attack_noTrans.py "${A[@]}" $(epochs finetune) --overwrite || return
  fi
  step sd3_fct "$attack" $PY calculate_consistency.py "${A[@]}" || return
  step sd3_plot "$attack" $PY visualize_consistency.py "${A[@]}" || return
  step sd4_gamma "$attack" $PY calculate_gamma.py "${A[@]}" || return
  step sd5_split "$attack" $PY separate_samples.py "${A[@]}" || return
  if [ "$SKIP_DBR" != 1 ]; then
    step dbr "$attack" $PY unlearn_relearn.py "${A[@]}" $(epochs dbr) --overwrite || return
  fi
  [ "$SKIP_DST" = 1 ] && return 0
  step dst_extractor "$attack" $PY ST/train_extractor.py "${A[@]}" $(epochs st_extractor) --overwrite || return
  step dst_classifier "$attack" $PY ST/train_classifier.py "${A[@]}" $(epochs st_classifier) --overwrite || return
  step dst_test "$attack" $PY ST/test.py "${A[@]}" || return
}

# worker W: take the attacks in order, each one not yet claimed by another worker (mkdir is atomic)
CLAIMS=$RUN_DIR/.claims; rm -rf "$CLAIMS"; mkdir -p "$CLAIMS"
worker() {
  local w=$1 attack
  if [ -n "$GPUS" ]; then
    local gpus=($GPUS); export CUDA_VISIBLE_DEVICES=${gpus[$((w % ${#gpus[@]}))]}
  elif [ "$NJOBS" -gt 1 ]; then
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # K jobs side by side on the CPU: one thread each
  fi
  for attack in $ATTACKS; do
    mkdir "$CLAIMS/$attack" 2>/dev/null || continue
    chain "$attack" || return
  done
}
NJOBS=$JOBS; [ -n "$GPUS" ] && NJOBS=$((JOBS * $(wc -w <<< "$GPUS")))
if [ "$NJOBS" = 1 ]; then
  worker 0 || exit
else
  trap 'trap - INT TERM; kill 0' INT TERM
  PIDS=(); for ((w = 0; w < NJOBS; w++)); do worker "$w" & PIDS+=($!); done
  FAILED=0; for pid in "${PIDS[@]}"; do wait "$pid" || FAILED=$?; done
  [ "$FAILED" = 0 ] || { echo "run_all.sh: a job failed (its step log is named above); the others ran to the end" >&2; exit "$FAILED"; }
fi

$PY report_results.py "${COMMON[@]}" --attacks $ATTACKS --times "$RUN_DIR/times.csv" --out_dir "$RESULTS_DIR" \
    --name "$DATASET${SEED:+_seed$SEED}${RECIPE_REPORT:+_$RECIPE_REPORT}"
