#!/usr/bin/env bash
# Here: split the checkpoint folder DIR (config.json, hypernetwork.safetensors) into DIR.0 (config, first half of the
# weights, PARTS, SHA256SUMS) and DIR.1 (second half), for two device calls: with the tracked tree (44 MB since
# session 20) a whole checkpoint (23.5 MB) passes the 64 MiB a call may carry. There, `stage.sh ckpt_NAME.0` and
# `stage.sh ckpt_NAME.1` (either order) rebuild it as /root/ckpt/NAME and check its sha256.
set -euo pipefail
dir=${1%/}
test -f "$dir/hypernetwork.safetensors" -a -f "$dir/config.json" || { echo "$dir: no config.json + hypernetwork.safetensors" >&2; exit 1; }
rm -rf "$dir.0" "$dir.1" && mkdir -p "$dir.0" "$dir.1"
split -n 2 -d "$dir/hypernetwork.safetensors" "$dir.0/hypernetwork.safetensors.part"
mv "$dir.0/hypernetwork.safetensors.part01" "$dir.1/"
cp "$dir/config.json" "$dir.0/" && echo 2 > "$dir.0/PARTS"
(cd "$dir" && sha256sum hypernetwork.safetensors) > "$dir.0/SHA256SUMS"
