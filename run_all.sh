#!/usr/bin/env bash
# run_all.sh: plans and launches the paper's comparison (Atari games x DQN/IQN x k values x seeds), or DQN's on the
# five MinAtar games, on this machine across its GPUs or cores, or on a SLURM cluster as one job array. ./run_all.sh --help
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
GAMES_CSV="$HERE/atari57.csv"
MINATAR_CSV="$HERE/minatar5.csv"  # the five MinAtar games: dqn_minatar_meanexp.py runs them
EXIT_REQUEUE=75    # the scripts' exit code after a checkpoint on SIGTERM/SIGUSR1: resume, do not count as failed
EXIT_INTERRUPTED=130  # the same after Ctrl-C (a run started by hand; run_all.sh itself sends SIGTERM)
EXIT_NON_FINITE=3  # the scripts' exit code when a run diverged: failed, and named so in the summary
EXIT_STORAGE=74    # the scripts' exit code when a write failed (disk full, quota, I/O): failed, not requeued, named so
ELSEWHERE=73       # run_one's exit code for a run another process is running (its run directory is locked): not started

usage() {
  cat <<EOF
Usage: $(basename "$0") [options] [-- flags passed to every run]

Plans one run per game x variant x seed and launches them. Runs go to ./runs/NAME
(NAME = GAME__VARIANT__sSEED); a run already finished is skipped, one that was stopped is
resumed from its checkpoint. Batch files (plans, logs, sbatch scripts) go to ./runs/_batch/.
With no options: the paper's comparison, 57 games x {dqn, ib_dqn, iqn, ib_iqn} x seeds 1-3.
With --games minatar: DQN's on MinAtar (dqn_minatar_meanexp.py), 5 games x {dqn, ib_dqn} (k = 0, k = |A| = 6) x seeds 1-3,
all the cores busy (docs/minatar.md).

What to run:
  --variants LIST       the paper's rows by name, comma-separated, or all (default: dqn,ib_dqn,iqn,ib_iqn; MinAtar's
                        games alone: dqn,ib_dqn; MinAtar runs dqn, ib_dqn, ib_dqn1 and the k of --algos dqn):
$(for v in "${PAPER_VARIANTS[@]}"; do printf '                          %-22s %s\n' "$v" "${VARIANT_ROW[$v]}"; done)
  --algos LIST          instead of --variants: dqn, iqn or both, each with every k of --k
  --k LIST              with --algos: numbers >= 0, or default (= |A|) (default: 0,default); variants are named
                        ALGO (k = 0), ib_ALGO (default), ib_dqn1 (dqn, k = 1) and ib_ALGO_kK (any other k)
  --games LIST          game names as in atari57.csv (breakout,ms_pacman,...), the sets atari5 and atari11
                        (the authors' plotting subsets), k_sensitivity (name_this_game, demon_attack,
                        star_gunner: the games of the authors' k figure), or all (default: all); MinAtar's
                        games as in minatar5.csv (minatar_breakout, ...) or the set minatar (all five)
  --games-file FILE     game names or sets, one per line (# starts a comment), instead of --games
  --seeds LIST          numbers and ranges: 1-3 (default), 1,4,7, 1-5,10
  --v4                  use the NoFrameskip-v4 ids (CleanRL's protocol: add its flags after --); surround has none
  --dry-run             print every planned command, launch nothing
  --backend local|slurm where to run (default: local)

Local backend:
  --gpus LIST           GPU indices to use (0,1,2,3), or none for CPU (default: every GPU nvidia-smi lists, else none)
  --runs-per-gpu N      runs sharing one GPU at a time (default: 1)
  --max-parallel P      at most P runs at a time (default: GPUs x runs-per-gpu; on CPU 1, or one per core for a plan of
                        MinAtar runs alone: 0.5 GB each)

SLURM backend (one array task per run; a task stopped by a time limit or preemption is requeued and resumes):
  --partition P         partition (default: the cluster's default)
  --account A           account to charge (default: none given)
  --time T              time limit per task, as sbatch takes it (default: 24:00:00)
  --gpus-per-task N     GPUs per task, 0 for none (default: 1)
  --cpus-per-task N     CPUs per task (default: 4)
  --mem M               memory per task, as sbatch takes it (default: 16G; the replay buffer alone needs 7.1 GB)
  --throttle N          at most N tasks running at once (the array's %N; default: no limit)
  --signal-lead S       seconds before the time limit at which a task is told to checkpoint (default: 300)

Environment: PYTHON (default: python, else python3) runs the scripts.
Exit code: 0 all planned runs finished; 1 a run failed; 2 bad input; 130 interrupted (Ctrl-C: every run
checkpoints and stops; run the same command again to resume them).
EOF
}

# The paper's rows: the script each runs and the flags that make it that row (PAPER.md; README.md, "The paper's rows")
PAPER_VARIANTS=(dqn ib_dqn ib_dqn1 dqn_rmsprop_huber ib_dqn_rmsprop_huber dueling_dqn rdq iqn ib_iqn)
declare -A VARIANT_SCRIPT=([dqn]=dqn [ib_dqn]=dqn [ib_dqn1]=dqn [dqn_rmsprop_huber]=dqn [ib_dqn_rmsprop_huber]=dqn
                          [dueling_dqn]=dqn [rdq]=dqn [iqn]=iqn [ib_iqn]=iqn)
declare -A VARIANT_FLAGS=([dqn]="--me-coef 0" [ib_dqn]="" [ib_dqn1]="--me-coef 1"
                         [dqn_rmsprop_huber]="--me-coef 0 --optimizer rmsprop --loss huber"
                         [ib_dqn_rmsprop_huber]="--optimizer rmsprop --loss huber" [dueling_dqn]="--network dueling"
                         [rdq]="--network rdq --loss mse" [iqn]="--me-coef 0" [ib_iqn]="")
declare -A VARIANT_ROW=([dqn]="DQN (Adam, sse)" [ib_dqn]="IB-DQN(k), k = |A|" [ib_dqn1]="IB-DQN(1)"
                       [dqn_rmsprop_huber]="DQN (RMSprop, Huber)" [ib_dqn_rmsprop_huber]="IB-DQN (RMSprop, Huber)"
                       [dueling_dqn]="Dueling DQN" [rdq]="RDQ (mse, as the authors ran it)" [iqn]="IQN" [ib_iqn]="IB-IQN, k = |A|")
# The authors' game subsets: their plotting's Atari-5 and 11 games, and the games of their k-sensitivity figure
# (plotting/plot_hypers_perf.py; with --algos dqn --k 0,1,32,64,128,256,512,1024 it is their whole sweep)
declare -A GAME_SETS=([atari5]="battle_zone double_dunk name_this_game phoenix qbert"
                      [atari11]="battle_zone double_dunk name_this_game phoenix qbert alien asterix seaquest space_invaders wizard_of_wor zaxxon"
                      [k_sensitivity]="name_this_game demon_attack star_gunner")

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
log() { echo "run_all.sh: $*"; }
count() { [ "$1" = 1 ] && echo "1 $2" || echo "$1 ${2}s"; }  # count N WORD: "1 run", "2 runs"

python_cmd() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif command -v python >/dev/null 2>&1; then echo python
  else echo python3; fi
}

# ---------------------------------------------------------------------------
# One run (both backends): fresh, resumed or skipped; signals reach the Python process
# ---------------------------------------------------------------------------

lock_holder() {  # lock_holder RUN_DIR: prints who holds the run directory's lock and succeeds, or fails where none does
  [ -f "$1/run.lock" ] || return 1
  "$(python_cmd)" - "$1/run.lock" <<'PY' 2>/dev/null
import fcntl, sys
with open(sys.argv[1]) as f:
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: nobody runs it (shared: never blocks another reader)
    except BlockingIOError:
        print(f.read().strip() or "a process starting up")
        sys.exit(0)
    except OSError:  # no locks on this filesystem: say nothing, the scripts warn
        pass
sys.exit(1)
PY
}

run_one() {  # run_one PLAN INDEX: the INDEX-th line (from 0) of PLAN is "NAME<TAB>SCRIPT<TAB>quoted flags"
  local plan=$1 index=$2 line name script flags
  line=$(sed -n "$((index + 1))p" "$plan")
  [ -n "$line" ] || die "no run $index in $plan"
  IFS=$'\t' read -r name script flags <<<"$line"
  local dir="runs/$name" py holder
  py=$(python_cmd)
  eval "local args=($flags)"
  if holder=$(lock_holder "$dir"); then  # before anything here is touched: the run is another process's
    echo "run_all.sh: $name is running elsewhere ($holder): not started"
    return "$ELSEWHERE"
  elif [ -f "$dir/final_eval.json" ]; then
    echo "run_all.sh: $name is finished (runs/$name/final_eval.json): skipped"
    return 0
  elif [ -f "$dir/checkpoint.pt" ] || compgen -G "$dir/checkpoint_step*.pt" >/dev/null; then
    args+=(--resume "$dir")
  elif [ -e "$dir" ]; then  # stopped before its first checkpoint: nothing to resume, keep it aside
    mkdir -p runs/_batch/stale
    mv "$dir" "runs/_batch/stale/$name.$(date +%Y%m%d-%H%M%S)"
  fi
  echo "run_all.sh: $(date '+%F %T') start $name on ${CUDA_VISIBLE_DEVICES:-CPU}: $py $script ${args[*]}"
  local child="" stop=0 code=0
  trap 'stop=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true' TERM USR1 INT  # the run checkpoints, exits 75
  "$py" "$HERE/$script" "${args[@]}" &
  child=$!
  [ "$stop" = 0 ] || kill -TERM "$child"  # a signal came before the run started
  while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done  # a trapped signal interrupts wait: wait on
  wait "$child" || code=$?  # bash keeps the ended run's exit code for this
  trap - TERM USR1 INT
  echo "run_all.sh: $(date '+%F %T') end $name: exit code $code"
  if [ "$code" = 2 ] && holder=$(lock_holder "$dir"); then  # it started as another process did: that one runs it
    echo "run_all.sh: $name is running elsewhere ($holder): not started"
    return "$ELSEWHERE"
  fi
  if [ "$code" = "$EXIT_REQUEUE" ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "run_all.sh: requeueing array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: it resumes from its checkpoint"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  fi
  return "$code"
}

if [ "${1:-}" = "--run-one" ]; then
  [ $# -eq 3 ] || die "--run-one PLAN INDEX"
  code=0
  run_one "$2" "$3" || code=$?
  exit "$code"
fi

# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------

variants="" algos="" games=all games_file="" seeds=1-3 ks="" v4=0 dry_run=0 backend=local
gpus="" runs_per_gpu=1 max_parallel="" partition="" account="" time_limit=24:00:00 gpus_per_task=1
cpus_per_task=4 mem=16G throttle="" signal_lead=300
extra=()
needs_value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --variants) needs_value "$@"; variants=$2; shift ;;
    --algos) needs_value "$@"; algos=$2; shift ;;
    --games) needs_value "$@"; games=$2; shift ;;
    --games-file) needs_value "$@"; games_file=$2; shift ;;
    --seeds) needs_value "$@"; seeds=$2; shift ;;
    --k) needs_value "$@"; ks=$2; shift ;;
    --v4) v4=1 ;;
    --dry-run) dry_run=1 ;;
    --backend) needs_value "$@"; backend=$2; shift ;;
    --gpus) needs_value "$@"; gpus=$2; shift ;;
    --runs-per-gpu) needs_value "$@"; runs_per_gpu=$2; shift ;;
    --max-parallel) needs_value "$@"; max_parallel=$2; shift ;;
    --partition) needs_value "$@"; partition=$2; shift ;;
    --account) needs_value "$@"; account=$2; shift ;;
    --time) needs_value "$@"; time_limit=$2; shift ;;
    --gpus-per-task) needs_value "$@"; gpus_per_task=$2; shift ;;
    --cpus-per-task) needs_value "$@"; cpus_per_task=$2; shift ;;
    --mem) needs_value "$@"; mem=$2; shift ;;
    --throttle) needs_value "$@"; throttle=$2; shift ;;
    --signal-lead) needs_value "$@"; signal_lead=$2; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }  # a whole number >= 1
for pair in "runs-per-gpu:$runs_per_gpu" "cpus-per-task:$cpus_per_task" "signal-lead:$signal_lead" \
            "max-parallel:${max_parallel:-1}" "throttle:${throttle:-1}"; do
  is_count "${pair#*:}" || die "--${pair%%:*} must be a whole number >= 1 (got '${pair#*:}')"
done
[[ $gpus_per_task =~ ^[0-9]+$ ]] || die "--gpus-per-task must be a whole number >= 0 (got '$gpus_per_task')"
case $backend in local|slurm) ;; *) die "--backend must be local or slurm (got '$backend')" ;; esac
if [ "$backend" = slurm ] && [ "$dry_run" = 0 ] && ! command -v sbatch >/dev/null 2>&1; then
  die "--backend slurm needs sbatch on PATH (is this a SLURM login node?)"
fi
if [ "$backend" = local ] && [ "$dry_run" = 0 ] && ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  die "the local backend needs bash 5.1 or newer for 'wait -n -p' (this is bash $BASH_VERSION); use --backend slurm"
fi

if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)
  [ -n "$gpus" ] || gpus=none
fi
gpu_list=()
if [ "$gpus" != none ]; then
  IFS=, read -ra gpu_list <<<"$gpus"
  for g in "${gpu_list[@]}"; do [[ $g =~ ^[0-9]+$ ]] || die "--gpus takes GPU indices such as 0,1, or none (got '$gpus')"; done
fi

seed_list=()
IFS=, read -ra seed_parts <<<"$seeds"
for part in "${seed_parts[@]}"; do
  if [[ $part =~ ^[0-9]+$ ]]; then seed_list+=("$part")
  elif [[ $part =~ ^([0-9]+)-([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ]; then
    for ((s = BASH_REMATCH[1]; s <= BASH_REMATCH[2]; s++)); do seed_list+=("$s"); done
  else die "--seeds takes numbers and ranges such as 1-3,7 (got '$part' in '$seeds')"; fi
done
[ ${#seed_list[@]} -gt 0 ] || die "--seeds is empty"

# Games: names and ids from atari57.csv and minatar5.csv
declare -A env_id=()
all_games=()
while IFS=, read -r game v5 v4id _; do
  [ "$game" = game ] && continue
  all_games+=("$game")
  if [ "$v4" = 1 ]; then env_id[$game]=$v4id; else env_id[$game]=$v5; fi
done <"$GAMES_CSV"
declare -A minatar_game=()
while IFS=, read -r game id; do
  [ "$game" = game ] && continue
  env_id[$game]=$id
  minatar_game[$game]=1
  GAME_SETS[minatar]+="${GAME_SETS[minatar]:+ }$game"  # the set minatar: every game of minatar5.csv
done <"$MINATAR_CSV"
if [ -n "$games_file" ]; then
  [ -f "$games_file" ] || die "--games-file '$games_file' does not exist"
  mapfile -t named < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$games_file" | grep -v '^$' || true)
  [ ${#named[@]} -gt 0 ] || die "--games-file '$games_file' names no game"
elif [ "$games" = all ]; then
  named=("${all_games[@]}")
else
  IFS=, read -ra named <<<"$games"
fi
game_list=()
declare -A planned_game=()
for g in "${named[@]}"; do  # a set stands for its games; a game named twice runs once
  read -ra members <<<"${GAME_SETS[$g]:-$g}"
  for m in "${members[@]}"; do
    [ -n "${env_id[$m]+x}" ] || die "unknown game '$m' (the names of atari57.csv: ${all_games[*]:0:5} ..., or atari5, atari11, k_sensitivity; the MinAtar games of minatar5.csv: ${GAME_SETS[minatar]}, or minatar; see --help)"
    [ -n "${env_id[$m]}" ] || die "game '$m' has no NoFrameskip-v4 id; drop it or --v4"
    [ "$v4" = 0 ] || [ -z "${minatar_game[$m]+x}" ] || die "--v4 is an Atari protocol: MinAtar's game '$m' has no v4 id; drop it or --v4"
    [ -n "${planned_game[$m]+x}" ] || game_list+=("$m")
    planned_game[$m]=1
  done
done

minatar_games=0  # how many of the planned games are MinAtar's
for g in "${game_list[@]}"; do [ -z "${minatar_game[$g]+x}" ] || minatar_games=$((minatar_games + 1)); done

# Variants: the paper's rows by name, or algorithms x k values
variant_list=()
if [ -z "$variants$algos$ks" ] && [ "$minatar_games" = "${#game_list[@]}" ]; then
  variant_list=(dqn ib_dqn)  # MinAtar's games alone: DQN at k = 0 and k = |A| (docs/minatar.md)
elif [ -n "$variants" ]; then
  [ -z "$algos$ks" ] || die "--variants and --algos/--k both choose what to run: give one of them"
  [ "$variants" != all ] || variants=$(IFS=,; echo "${PAPER_VARIANTS[*]}")
  IFS=, read -ra variant_list <<<"$variants"
  [ ${#variant_list[@]} -gt 0 ] || die "--variants is empty"
  for v in "${variant_list[@]}"; do
    [ -n "${VARIANT_SCRIPT[$v]+x}" ] || die "unknown variant '$v' in --variants (allowed: ${PAPER_VARIANTS[*]}, or all)"
  done
else
  IFS=, read -ra algo_list <<<"${algos:-dqn,iqn}"
  [ ${#algo_list[@]} -gt 0 ] || die "--algos is empty"
  for a in "${algo_list[@]}"; do
    case $a in dqn|iqn) ;; *) die "unknown algorithm '$a' in --algos (allowed: dqn, iqn)" ;; esac
  done
  IFS=, read -ra k_list <<<"${ks:-0,default}"
  [ ${#k_list[@]} -gt 0 ] || die "--k is empty"
  for k in "${k_list[@]}"; do
    [[ $k == default || $k =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--k takes numbers >= 0 and 'default' (got '$k' in '$ks')"
  done
  for a in "${algo_list[@]}"; do
    for k in "${k_list[@]}"; do
      if [ "$k" = default ]; then v=ib_$a
      elif [[ $k =~ ^0+(\.0+)?$ ]]; then v=$a
      elif [ "$a" = dqn ] && [[ $k =~ ^0*1(\.0+)?$ ]]; then v=ib_dqn1
      else v=ib_${a}_k$k; VARIANT_SCRIPT[$v]=$a; VARIANT_FLAGS[$v]="--me-coef $k"; fi
      variant_list+=("$v")
    done
  done
fi
if [ "$minatar_games" -gt 0 ]; then  # dqn_minatar_meanexp.py is DQN with the paper's loss and optimizer: k is its one choice
  for v in "${variant_list[@]}"; do
    [ "${VARIANT_SCRIPT[$v]}" = dqn ] && [[ -z ${VARIANT_FLAGS[$v]} || ${VARIANT_FLAGS[$v]} =~ ^--me-coef\ [0-9.]+$ ]] \
      || die "variant '$v' has no MinAtar run: on MinAtar's games run dqn, ib_dqn, ib_dqn1, or --algos dqn with --k"
  done
fi
script_of() {  # script_of GAME VARIANT: the script that runs it
  if [ -n "${minatar_game[$1]+x}" ]; then echo dqn_minatar_meanexp.py; else echo "${VARIANT_SCRIPT[$2]}_atari_meanexp.py"; fi
}

# ---------------------------------------------------------------------------
# The plan: one line per run
# ---------------------------------------------------------------------------

# --track: every run of the batch joins one wandb group, the same when the same command runs again (to resume)
if printf '%s\n' "${extra[@]+"${extra[@]}"}" | grep -qx -- '--track' \
   && ! printf '%s\n' "${extra[@]+"${extra[@]}"}" | grep -q -- '^--wandb-group'; then
  batch_id=$(printf '%s\n' "${variant_list[@]}" "${game_list[@]}" "${seed_list[@]}" "$v4" "${extra[@]}" | md5sum | cut -c1-8)
  extra+=(--wandb-group "run_all-$batch_id")
fi

plan_lines=()
for game in "${game_list[@]}"; do
  for variant in "${variant_list[@]}"; do
    read -ra variant_flags <<<"${VARIANT_FLAGS[$variant]}"
    for seed in "${seed_list[@]}"; do
      name="${game}__${variant}__s${seed}"
      [ "$v4" = 0 ] || name+="__v4"  # another protocol: never skipped or resumed as the v5 run of the same name
      flags=(--env-id "${env_id[$game]}" --seed "$seed" "${variant_flags[@]+"${variant_flags[@]}"}")
      flags+=("${extra[@]+"${extra[@]}"}" --run-name "$name")
      plan_lines+=("$name"$'\t'"$(script_of "$game" "$variant")"$'\t'"$(printf '%q ' "${flags[@]}")")
    done
  done
done
names=$(printf '%s\n' "${plan_lines[@]}" | cut -f1 | sort | uniq -d)
[ -z "$names" ] || die "the plan names a run twice: $(echo $names)"

# The scripts check the flags of every variant with the extra flags themselves, in one process, before anything is launched
for flag in "${extra[@]+"${extra[@]}"}"; do
  case ${flag%%=*} in
    --env-id|--seed|--run-name|--resume) die "$flag after -- is set by run_all.sh for each run (use --games, --seeds)" ;;
    --me-coef|--network|--loss|--optimizer) die "$flag after -- is set by the variant (use --variants, or --algos with --k)" ;;
  esac
done
check=()
declare -A checked=()
for game in "${game_list[@]}"; do
  for variant in "${variant_list[@]}"; do
    script=$(script_of "$game" "$variant")
    [ -z "${checked[$script $variant]+x}" ] || continue  # once per script and variant
    checked[$script $variant]=1
    read -ra variant_flags <<<"${VARIANT_FLAGS[$variant]}"
    check+=("${script%.py}" "$variant" $(( ${#variant_flags[@]} + ${#extra[@]} )))
    check+=("${variant_flags[@]+"${variant_flags[@]}"}" "${extra[@]+"${extra[@]}"}")
  done
done
code=0
"$(python_cmd)" - "$HERE" "${check[@]}" <<'PY' || code=$?
import importlib, sys
sys.path.insert(0, sys.argv[1])
argv, bad = sys.argv[2:], False
while argv:
    name, variant, n = argv[0], argv[1], int(argv[2])
    flags, argv = argv[3:3 + n], argv[3 + n:]
    try:
        script = importlib.import_module(name)
    except ImportError as error:  # not the flags' fault: say what is missing
        print(f"error: cannot import {name}.py with {sys.executable}: {error} "
              "(pip install -r requirements.txt, or set PYTHON)", file=sys.stderr)
        sys.exit(3)
    try:
        args = script.parse_args(flags)
        errors = script.check_args(args) + importlib.import_module("longrun").check_flags(args)
    except SystemExit:  # the command line parser has printed what is wrong: once is enough
        print(f"error: variant {variant}: {' '.join(flags)}: not a valid command line for {name}.py (above)",
              file=sys.stderr)
        sys.exit(2)
    for message in errors:
        print(f"error: variant {variant} ({name}.py): {message}", file=sys.stderr)
    bad |= bool(errors)
sys.exit(2 if bad else 0)
PY
[ "$code" != 3 ] || die "the scripts cannot be imported (above): nothing was checked or launched"
[ "$code" = 0 ] || die "the flags after -- are not valid for every variant (above)"

todo=()  # plan lines of the runs not finished yet
done_before=0
for line in "${plan_lines[@]}"; do
  if [ -f "runs/${line%%$'\t'*}/final_eval.json" ]; then done_before=$((done_before + 1)); else todo+=("$line"); fi
done
stamp=$(date +%Y%m%d-%H%M%S)
plan=runs/_batch/plan-$stamp.tsv

sbatch_script() {  # the SLURM backend's job array: one task per line of $plan
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=meanexp"
  echo "#SBATCH --array=0-$((${#todo[@]} - 1))${throttle:+%$throttle}"
  [ -z "$partition" ] || echo "#SBATCH --partition=$partition"
  [ -z "$account" ] || echo "#SBATCH --account=$account"
  echo "#SBATCH --time=$time_limit"
  [ "$gpus_per_task" = 0 ] || echo "#SBATCH --gres=gpu:$gpus_per_task"
  echo "#SBATCH --cpus-per-task=$cpus_per_task"
  echo "#SBATCH --mem=$mem"
  echo "#SBATCH --output=$PWD/runs/_batch/slurm/%A_%a.out"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=B:USR1@$signal_lead"
  echo "# USR1 comes $signal_lead s before the time limit: the run checkpoints, exits $EXIT_REQUEUE and the task requeues itself"
  echo "export OMP_NUM_THREADS=\${OMP_NUM_THREADS:-\$SLURM_CPUS_PER_TASK}  # PyTorch's CPU threads: this task's CPUs"
  echo "cd $(printf '%q' "$PWD")"
  echo "exec $(printf '%q' "$SELF") --run-one $(printf '%q' "$PWD/$plan") \"\$SLURM_ARRAY_TASK_ID\""
}

if [ "$dry_run" = 1 ]; then
  py=$(python_cmd)
  for line in "${plan_lines[@]}"; do
    IFS=$'\t' read -r name script flags <<<"$line"
    echo "$py $HERE/$script $flags"
  done
  echo "# $(count ${#plan_lines[@]} run): $(count ${#game_list[@]} game) x $(count ${#variant_list[@]} variant) (${variant_list[*]}) x $(count ${#seed_list[@]} seed)" >&2
  if [ "$backend" = slurm ] && [ ${#todo[@]} -gt 0 ]; then
    echo "# the sbatch script for the ${#todo[@]} runs not finished yet (not written, not submitted):" >&2
    sbatch_script >&2
  fi
  exit 0
fi

mkdir -p runs/_batch/logs
printf '%s\n' "${todo[@]+"${todo[@]}"}" >"$plan"
log "$(count ${#plan_lines[@]} run) planned: $done_before already finished (skipped), ${#todo[@]} to run; plan in $plan"
[ ${#todo[@]} -gt 0 ] || exit 0

# ---------------------------------------------------------------------------
# SLURM backend: one sbatch job array
# ---------------------------------------------------------------------------

if [ "$backend" = slurm ]; then
  batch=runs/_batch/slurm-$stamp.sbatch
  mkdir -p runs/_batch/slurm
  sbatch_script >"$batch"
  log "sbatch script: $batch"
  job=$(sbatch --parsable "$batch") || die "sbatch refused $batch (its message is above)"
  log "submitted job array $job (${#todo[@]} tasks); watch it with: squeue -j ${job%%;*}"
  log "task logs: runs/_batch/slurm/${job%%;*}_INDEX.out; run this command again after the array ends to pick up failures"
  exit 0
fi

# ---------------------------------------------------------------------------
# Local backend: at most P runs at a time, each pinned to a GPU
# ---------------------------------------------------------------------------

slots=()  # one entry per concurrent run: the GPU it uses ("" on CPU)
if [ ${#gpu_list[@]} -eq 0 ]; then
  slots=("")
else
  for ((r = 0; r < runs_per_gpu; r++)); do slots+=("${gpu_list[@]}"); done
fi
parallel=${max_parallel:-${#slots[@]}}
if [ -z "$max_parallel" ] && [ ${#gpu_list[@]} -eq 0 ] && [ "$minatar_games" = "${#game_list[@]}" ]; then
  parallel=$(nproc)  # MinAtar runs alone on CPU: one per core (0.5 GB each), every core busy
fi
for ((s = ${#slots[@]}; s < parallel; s++)); do slots+=("${slots[$((s % ${#slots[@]}))]}"); done  # share GPUs round-robin
# PyTorch's CPU threads: the cores shared out between the runs, not every run on every core
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / parallel > 0 ? $(nproc) / parallel : 1 ))}
log "local: at most $parallel at a time, on ${gpus/none/CPU}, $OMP_NUM_THREADS CPU threads each; logs in runs/_batch/logs/NAME.log"

declare -A slot_of=() name_of=() command_of=()  # running: pid -> slot, run name, command
free=()
for ((s = 0; s < parallel; s++)); do free+=("$s"); done
finished=() failed=() failed_commands=() stopped=() elsewhere=()
interrupted=0

stop_all() {  # a trap: it runs inside collect(), so its variable must be local not to overwrite collect's
  local run
  interrupted=1
  log "stopping: every run checkpoints and exits (run the same command again to resume them)"
  for run in "${!name_of[@]}"; do kill -TERM "$run" 2>/dev/null || true; done
}
trap stop_all INT TERM

collect() {  # waits for one run to end and records how it ended
  local pid code=0
  wait -n -p pid "${!name_of[@]}" || code=$?
  [ -n "${pid:-}" ] || return 0  # interrupted by a signal: nothing ended
  local name=${name_of[$pid]} why=""
  [ "$code" != "$EXIT_NON_FINITE" ] || why=", diverged"
  [ "$code" != "$EXIT_STORAGE" ] || why=", a write failed: disk full, quota or I/O error (free room, then run again)"
  case $code in
    0) finished+=("$name") ;;
    "$ELSEWHERE")
       elsewhere+=("$name: $({ grep -o 'running elsewhere (.*)' "runs/_batch/logs/$name.log" || true; } | tail -n 1 | sed 's/^running elsewhere //')") ;;
    "$EXIT_REQUEUE" | "$EXIT_INTERRUPTED")
       local at  # the run's last words: "signal SIGTERM: checkpoint at step 1,200 in ..."
       at=$(grep -o 'checkpoint at step [0-9,]*' "runs/_batch/logs/$name.log" | tail -n 1 || true)
       stopped+=("$name: ${at:-checkpoint} in runs/$name/checkpoint.pt, resumed when this command runs again") ;;
    *) failed+=("$name (exit code $code$why): runs/_batch/logs/$name.log")
       failed_commands+=("${command_of[$pid]}") ;;
  esac
  free+=("${slot_of[$pid]}")
  unset "name_of[$pid]" "slot_of[$pid]" "command_of[$pid]"
}

for i in "${!todo[@]}"; do
  [ "$interrupted" = 0 ] || break
  while [ ${#free[@]} -eq 0 ]; do collect; done
  [ "$interrupted" = 0 ] || break
  slot=${free[0]}
  free=("${free[@]:1}")
  name=${todo[$i]%%$'\t'*}
  gpu=${slots[$slot]}
  # setsid: a Ctrl-C in the terminal reaches only run_all.sh, which asks each run to checkpoint first
  if [ -n "$gpu" ]; then
    CUDA_VISIBLE_DEVICES=$gpu setsid "$SELF" --run-one "$plan" "$i" >>"runs/_batch/logs/$name.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES="" setsid "$SELF" --run-one "$plan" "$i" >>"runs/_batch/logs/$name.log" 2>&1 &
  fi
  slot_of[$!]=$slot
  name_of[$!]=$name
  IFS=$'\t' read -r _ script flags <<<"${todo[$i]}"
  command_of[$!]="$(python_cmd) $HERE/$script $flags"  # as first launched; its log's 'start' line shows any --resume
  log "started $name on ${gpu:-CPU} (log: runs/_batch/logs/$name.log)"
done
while [ ${#name_of[@]} -gt 0 ]; do collect; done

log "summary: ${#plan_lines[@]} planned, $done_before skipped (finished before), ${#finished[@]} finished now, ${#stopped[@]} stopped with a checkpoint, ${#failed[@]} failed, ${#elsewhere[@]} running elsewhere, $(( ${#todo[@]} - ${#finished[@]} - ${#stopped[@]} - ${#failed[@]} - ${#elsewhere[@]} )) not started"
for f in "${!failed[@]}"; do log "failed: ${failed[$f]}"; log "  command: ${failed_commands[$f]}"; done
[ ${#failed[@]} -eq 0 ] || log "run this command again to retry the failed runs (each resumes from its last checkpoint: read its log first)"
for s in "${stopped[@]}"; do log "stopped: $s"; done
for e in "${elsewhere[@]}"; do log "running elsewhere, not started here: $e"; done
if [ "$interrupted" = 1 ]; then exit 130; fi
[ ${#failed[@]} -eq 0 ] || exit 1
exit 0
