#!/usr/bin/env bash
# Here: checkpoints that were trained but not shipped live in git history only (committed once, then removed, so they
# neither travel to the device with the tracked files nor sit in the package). Restore one into .stage/ckpt_NAME.
# Usage: bash benchmarks/device/restore_ckpt.sh NAME   (NAME as in benchmarks/device/checkpoints.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1
line=$(grep "^$name " benchmarks/device/checkpoints.txt) || { echo "unknown checkpoint $name; see benchmarks/device/checkpoints.txt" >&2; exit 1; }
read -r _ commit path _ <<< "$line"
mkdir -p .stage/ckpt_$name
for f in config.json hypernetwork.safetensors; do git show "$commit:$path/$f" > .stage/ckpt_$name/$f; done
bash benchmarks/device/split_ckpt.sh .stage/ckpt_$name
ls -la .stage/ckpt_$name .stage/ckpt_$name.0 .stage/ckpt_$name.1
