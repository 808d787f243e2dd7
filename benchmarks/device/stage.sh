#!/usr/bin/env bash
# There: keep GGUF part $1 (a, b, c, f, d) under /root/stage; with part d (the last), join and check the GGUF, install wheels.
# `stage.sh e`: unpack the training data (its own call: with part d and the tracked tree it passes the 64 MiB carry limit).
# `stage.sh ckpt_NAME`: keep the checkpoint folder .stage/ckpt_NAME as /root/ckpt/NAME (an --init for launch.sh).
set -euo pipefail
part=$1
if [[ $part == ckpt_* ]]; then
  mkdir -p /root/ckpt && rm -rf /root/ckpt/${part#ckpt_} && cp -r .stage/$part /root/ckpt/${part#ckpt_} && ls -la /root/ckpt/*
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
