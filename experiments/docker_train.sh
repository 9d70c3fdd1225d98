#!/usr/bin/env bash
# Trains one experiment of this folder in the tf_medseg Docker image (the repository's Dockerfile)
# on the GPUs of one node: one GPU directly, several through horovodrun (Gloo launcher, NCCL
# all-reduce).
#
#   experiments/docker_train.sh TASK CONFIG DATA_DIR WORKDIR [GPUS]
#   experiments/docker_train.sh spleen proposed /data/Task09_Spleen runs/spleen 8
#   experiments/docker_train.sh liver ablations/proposed-cache /data/Task03_Liver runs/liver_nocache
#
# The data folder is mounted read-only under its own name (the paper's split is chosen by the
# folder's name, e.g. Task09_Spleen), this folder read-only at /experiments, and WORKDIR (created
# if missing) at /workdir. Flags after the fifth argument go to tf-medseg-train.
# TF_MEDSEG_IMAGE names the image (default tf-medseg); DOCKER=echo prints the command instead.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,14p' "$0" >&2
    exit 2
fi
task=$1 config=$2 data=$3 workdir=$4 gpus=${5:-1}
shift $(($# < 5 ? $# : 5))
here=$(cd "$(dirname "$0")" && pwd)
flagfile="$here/$task/$config.flags"
[ -f "$flagfile" ] || { echo "docker_train.sh: no experiment $flagfile" >&2; exit 2; }
[ -d "$data" ] || { echo "docker_train.sh: no data folder $data" >&2; exit 2; }
data=$(cd "$data" && pwd)
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
name=$(basename "$data")
train=(tf-medseg-train "--flagfile=/experiments/$task/$config.flags" "--data_dir=/data/$name"
    --workdir=/workdir "$@")
run=("${DOCKER:-docker}" run --gpus all --rm --ipc=host -v "$here:/experiments:ro"
    -v "$data:/data/$name:ro" -v "$workdir:/workdir")
image=${TF_MEDSEG_IMAGE:-tf-medseg}
if [ "$gpus" -eq 1 ]; then
    exec "${run[@]}" "$image" "${train[@]:1}"
fi
exec "${run[@]}" --entrypoint horovodrun "$image" -np "$gpus" -H "localhost:$gpus" --gloo \
    "${train[@]}"
