#!/usr/bin/env bash
# Set up this checkout on every worker of a Cloud TPU VM slice and launch an experiment there.
#
#   ./tpu_setup.sh --name my-v4-32 --zone us-central2-b --project my-project \
#       --experiment gpt2_small --set train.steps=5000 --run-dir /mnt/shared/runs/gpt2_small
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   1. pack the committed tree (git archive HEAD) into a tarball;
#   2. copy it to every worker (gcloud compute tpus tpu-vm scp --worker=all);
#   3. unpack it and pip install the package with jax[tpu] on every worker;
#   4. start `research train` on every worker at once (gcloud ... ssh --worker=all), detached,
#      logging to ~/research-train.log. The processes find each other through
#      jax.distributed (RESEARCH_COORDINATOR=auto: JAX reads the slice's topology).
#
# The run directory must be the same shared storage on every worker (a gcsfuse or Filestore
# mount): orbax writes each checkpoint from all workers into one directory.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu_setup.sh --name TPU_NAME --zone ZONE --project PROJECT [options]

  --name NAME          the TPU VM (slice) name
  --zone ZONE          its zone, e.g. us-central2-b
  --project PROJECT    its Google Cloud project
  --experiment EXP     experiment to launch after set-up (default: shakespeare_char)
  --set KEY=VALUE      config override passed to `research train` (repeatable)
  --run-dir DIR        train.run_dir on the workers (shared storage for multi-worker slices)
  --skip-install       only launch (the package is already installed)
  --no-launch          only install
  --dry-run            print the exact commands and run nothing
  -h, --help           this text

example:
  ./tpu_setup.sh --name my-v4-32 --zone us-central2-b --project my-project \
      --experiment gpt2_small --set mesh.fsdp=-1 --set mesh.data=1 --dry-run
EOF
}

name="" zone="" project="" experiment="shakespeare_char" run_dir=""
install=1 launch=1 dry_run=0
overrides=()

need_value() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    echo "error: $1 needs a value (see --help)" >&2
    exit 2
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --experiment) need_value "$@"; experiment="$2"; shift 2 ;;
    --set) need_value "$@"; overrides+=("$2"); shift 2 ;;
    --run-dir) need_value "$@"; run_dir="$2"; shift 2 ;;
    --skip-install) install=0; shift ;;
    --no-launch) launch=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
[[ -n "$name" ]] || missing+=(--name)
[[ -n "$zone" ]] || missing+=(--zone)
[[ -n "$project" ]] || missing+=(--project)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: missing ${missing[*]}: the TPU VM's name, zone and project are all required" >&2
  exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tarball="${TMPDIR:-/tmp}/research-$name.tar.gz"
target=(--zone "$zone" --project "$project" --worker=all)

# One word as the shell would need it typed: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print a command exactly (it can be pasted into a shell), then run it unless --dry-run.
run() {
  local words=()
  for word in "$@"; do
    words+=("$(quote "$word")")
  done
  echo "${words[*]}"
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

if [[ $install -eq 1 ]]; then
  run git -C "$repo_root" archive --format=tar.gz --prefix=research/ -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:research.tar.gz" "${target[@]}"
  install_cmd='rm -rf ~/research && tar -xzf ~/research.tar.gz -C ~'
  install_cmd+=' && python3 -m pip install --upgrade pip'
  install_cmd+=' && python3 -m pip install -e ~/research"[tpu]"'
  install_cmd+=' && python3 -c "import jax; print(jax.process_index(), jax.local_devices())"'
  run gcloud compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$install_cmd"
fi

if [[ $launch -eq 1 ]]; then
  train_args=("$experiment")
  for item in "${overrides[@]}"; do
    train_args+=(--set "$item")
  done
  if [[ -n "$run_dir" ]]; then
    train_args+=(--set "train.run_dir=$run_dir")
  fi
  quoted=()
  for word in "${train_args[@]}"; do
    quoted+=("$(quote "$word")")
  done
  launch_cmd="cd ~/research && RESEARCH_COORDINATOR=auto nohup python3 -m research.cli train"
  launch_cmd+=" ${quoted[*]} > ~/research-train.log 2>&1 &"
  run gcloud compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$launch_cmd"
  echo "follow it with: gcloud compute tpus tpu-vm ssh $name --zone $zone --project $project" \
    "--worker=0 --command 'tail -f ~/research-train.log'"
fi
