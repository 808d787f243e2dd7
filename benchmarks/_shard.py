"""Split a state dict into <=15 MB bf16 safetensors shards (the device returns files of at most 16 MiB)."""
import sys

import torch
from safetensors.torch import save_file

state = torch.load(sys.argv[1], map_location="cpu")
state = state.get("state", state)
items = []
for k, v in state.items():
    v = v.to(torch.bfloat16).contiguous()
    if v.numel() * 2 > 14_000_000:
        parts = torch.chunk(v, 4, dim=0)
        items += [(f"{k}#part{i}of{len(parts)}", p.contiguous()) for i, p in enumerate(parts)]
    else:
        items.append((k, v))
shard, size, i = {}, 0, 0
for k, v in items:
    b = v.numel() * 2
    if shard and size + b > 15_000_000:
        save_file(shard, f"{sys.argv[2]}/w{i}.safetensors")
        i, shard, size = i + 1, {}, 0
    shard[k] = v
    size += b
save_file(shard, f"{sys.argv[2]}/w{i}.safetensors")
print("shards", i + 1)
