#!/usr/bin/env bash
# There: keep GGUF part $1 (a, b, c, f, d) under /root/stage; with part d (the last), join and check the GGUF, install wheels.
# `stage.sh e`: unpack the training data (its own call: with part d and the tracked tree it passes the 64 MiB carry limit).
# `stage.sh ckpt_NAME`: keep the checkpoint folder .stage/ckpt_NAME as /root/ckpt/NAME (an --init for launch.sh);
# `stage.sh ckpt_NAME.0` then `ckpt_NAME.1` (two calls): the same from the two halves restore_ckpt.sh writes.
set -euo pipefail
part=$1
CKPT_ROOT=${CKPT_ROOT:-/root/ckpt}
if [[ $part == ckpt_*.[0-9] ]]; then
  # one half of a checkpoint that restore_ckpt.sh split (a whole one, 23.5 MB, and the tracked tree, 44 MB, pass the
  # 64 MiB carry limit): the halves go in any order, and the last one joins them and checks the sha256
  name=${part#ckpt_}; name=${name%.[0-9]}; dest=$CKPT_ROOT/$name
  mkdir -p "$dest" && cp .stage/$part/* "$dest"/
  if [ -f "$dest/PARTS" ] && [ "$(ls "$dest"/hypernetwork.safetensors.part* | wc -l)" -eq "$(cat "$dest/PARTS")" ]; then
    cat "$dest"/hypernetwork.safetensors.part* > "$dest/hypernetwork.safetensors"
    if ! (cd "$dest" && sha256sum -c SHA256SUMS); then
      rm -rf "$dest"; echo "$name: the joined weights do not match their sha256: stage both halves again" >&2; exit 1
    fi
    rm "$dest"/hypernetwork.safetensors.part* "$dest/PARTS" "$dest/SHA256SUMS"
  fi
  ls -la "$dest"
  exit 0
fi
if [[ $part == ckpt_* ]]; then
  mkdir -p "$CKPT_ROOT" && rm -rf "$CKPT_ROOT/${part#ckpt_}" && cp -r .stage/$part "$CKPT_ROOT/${part#ckpt_}" && ls -la "$CKPT_ROOT"/*
  exit 0
fi
if [ "$part" = e ]; then
  mkdir -p /root/data && tar -C /root/data -xzf .stage/e/data.tgz && ls /root/data
  exit 0
fi
mkdir -p /root/stage
cp .stage/$part/smol.part0* /root/stage/
if [ "$part" = d ]; then
  cat /root/stage/smol.part0? > /root/stage/smol.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/stage/smol.gguf" | sha256sum -c
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
ls -la /root/stage; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
