#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod slice), installs this checkout
# with the `tpu` extra on every host, and runs tiered_routing.train on all
# hosts at once (jax.distributed finds the other hosts by itself on TPU VMs,
# so --multi_host needs no coordinator flags).
#
# Dry run by default: prints the gcloud commands. Add --run to execute them.
#
#   scripts/launch_tpu.sh --name=tr-v4-32 --zone=us-central2-b \
#     --accelerator=v4-32 --project=my-project \
#     --gin_file=gin/experiments/mc4_n4_family_none.gin \
#     --model_dir=gs://my-bucket/runs/mc4_n4_family_none \
#     -- --gin.TRAIN_STEPS=50000
#
# Everything after `--` is passed to the train binary. Environment for the
# data (TFDS_DATA_DIR, TR_SPM_MODEL, TR_MC4_JSON_DIR) is forwarded to the
# hosts when set here. Steps: create | install | train | all (default).
# The TPU runtime's python3 is 3.10, below the supported versions, so the
# install step puts Python 3.11 in a virtualenv (~/tr-venv) with uv.
#
# What is verified without a pod (tests/train/test_two_processes.py): the
# train binary as two jax.distributed processes on localhost (4 CPU devices
# each) reads per host only its partitions' rows, matches a one-process run
# within 1e-5, writes an Orbax checkpoint that restores in one process, and
# resumes bitwise after both processes are killed. Not verified: TPU
# collectives, gs:// checkpoints, more than two hosts.

set -euo pipefail

NAME="tiered-routing"
ZONE="us-central2-b"
ACCELERATOR="v4-8"
RUNTIME="tpu-ubuntu2204-base"
PROJECT=""
GIN_FILE="gin/experiments/mc4_n4_family_none.gin"
MODEL_DIR=""
SPOT=0
RUN=0
STEP="all"
REMOTE_DIR="tiered_routing"
PYTHON_VERSION="3.11"
VENV="~/tr-venv"
TRAIN_ARGS=()

usage() {
  # The header comment, up to the first line that is not a comment.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  cat <<'EOF'

Flags: --name= --zone= --accelerator= --runtime= --project= --gin_file=
       --model_dir= (required for the train step; gs:// on pods) --spot
       --step=create|install|train|all --run --help
EOF
}

for arg in "$@"; do
  if [[ ${#TRAIN_ARGS[@]} -gt 0 || "$arg" == "--" ]]; then
    [[ "$arg" == "--" && ${#TRAIN_ARGS[@]} -eq 0 ]] && TRAIN_ARGS=("--") \
      || TRAIN_ARGS+=("$arg")
    continue
  fi
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --runtime=*) RUNTIME="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --gin_file=*) GIN_FILE="${arg#*=}" ;;
    --model_dir=*) MODEL_DIR="${arg#*=}" ;;
    --step=*) STEP="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --run) RUN=1 ;;
    --help|-h) usage; exit 0 ;;
    *) echo "Unknown flag: $arg (see --help)" >&2; exit 2 ;;
  esac
done
TRAIN_ARGS=("${TRAIN_ARGS[@]:1}")  # Drop the leading "--".

case "$STEP" in
  create|install|train|all) ;;
  *) echo "--step=$STEP must be create, install, train or all" >&2; exit 2 ;;
esac
if [[ "$STEP" == train || "$STEP" == all ]] && [[ -z "$MODEL_DIR" ]]; then
  echo "--model_dir is required to train (a gs:// path on pod slices, where" \
       "every host writes checkpoints)" >&2
  exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# One shell word: as is when safe, in double quotes when that needs no
# escapes (gin string literals such as --gin.MODEL_DIR='gs://b/run'), else in
# single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  elif [[ ! "$1" =~ [\"\$\`\\!] ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command (copy-pasteable); runs it too with --run.
run() {
  local arg line=""
  for arg in "$@"; do
    line+="$(quote "$arg") "
  done
  echo "${line% }"
  if [[ "$RUN" == 1 ]]; then
    "$@"
  fi
}

create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
}

install() {
  # The checkout itself goes to every host (no git access needed there).
  local repo
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  run "${GCLOUD[@]}" scp --recurse "$repo" "$NAME:~/$REMOTE_DIR" \
    "${COMMON[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="\
curl -LsSf https://astral.sh/uv/install.sh | sh && \
~/.local/bin/uv venv --python $PYTHON_VERSION $VENV && cd ~/$REMOTE_DIR && \
~/.local/bin/uv pip install --python $VENV/bin/python -e '.[tpu]' \
-c constraints.txt"
}

train_script() {
  # What every host runs: the same command, quoted once.
  local var line
  echo "#!/usr/bin/env bash"
  echo "cd ~/$REMOTE_DIR"
  for var in TFDS_DATA_DIR TR_SPM_MODEL TR_MC4_JSON_DIR; do
    if [[ -n "${!var:-}" ]]; then
      echo "export $var=$(quote "${!var}")"
    fi
  done
  line="exec $VENV/bin/python -m tiered_routing.train --multi_host"
  for var in "--gin_file=$GIN_FILE" "--gin.MODEL_DIR='$MODEL_DIR'" \
      "${TRAIN_ARGS[@]}"; do
    line+=" $(quote "$var")"
  done
  echo "$line"
}

train() {
  # The script travels inside the ssh command (base64, so no quoting and no
  # local temporary file that a printed command could refer to).
  local encoded
  echo "# run_train.sh, written on every host:"
  train_script | sed 's/^/#   /'
  encoded="$(train_script | base64 | tr -d '\n')"
  # Every host runs the same command; logs go to each host's train.log.
  run "${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="cd \
~/$REMOTE_DIR && echo $encoded | base64 -d > run_train.sh && \
nohup bash run_train.sh > train.log 2>&1 &"
}

[[ "$RUN" == 1 ]] || echo "# Dry run (add --run to execute):"
case "$STEP" in
  create) create ;;
  install) install ;;
  train) train ;;
  all) create; install; train ;;
esac
echo "# Follow: ${GCLOUD[*]} ssh $NAME ${COMMON[*]} --worker=0" \
  "--command='tail -f ~/$REMOTE_DIR/train.log'"
echo "# Delete: ${GCLOUD[*]} delete $NAME ${COMMON[*]}"
