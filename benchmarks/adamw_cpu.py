"""AdamW implementations on the small preset's parameters, 1 thread: the per-tensor loop, the multi-tensor
(foreach) one `build_optimizer` uses for fp32, and the fused one bf16 runs use (benchmarks/RESULTS.md, issue 15).

    PYTHONPATH=src python3 benchmarks/adamw_cpu.py
"""
import gc
import time

import torch

from dsv3.config import preset
from dsv3.model import Transformer
from dsv3.train.optim import build_optimizer, param_groups
torch.set_num_threads(1)
torch.manual_seed(0)
m = Transformer(preset("small").replace(num_nextn_predict_layers=0), max_seq_len=128)
n = sum(p.numel() for p in m.parameters())
for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-3
res = {}
for name, make in (("foreach=False (before)", lambda: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False)),
                   ("foreach (fp32 now)", lambda: build_optimizer(m, 1e-3)),
                   ("fused (bf16 now)", lambda: build_optimizer(m, 1e-3, fused=True))):
    opt = make(); opt.step()
    ts = []
    for _ in range(3):
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
    print(f"{name:24s} min {min(ts):6.2f} s  median {sorted(ts)[1]:6.2f} s  ({min(ts) / n * 1e9:5.1f} ns/param)", flush=True)
    del opt; gc.collect()
print("params", n, "load", __import__("os").getloadavg())
