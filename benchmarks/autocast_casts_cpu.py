"""Casts and GEMM operand dtypes of one forward + backward under CPU bf16 autocast (the trainer's losses),
counted with a TorchDispatchMode (benchmarks/RESULTS.md, issue 15).

    PYTHONPATH=src python3 benchmarks/autocast_casts_cpu.py small
"""
import collections
import json
import sys

import torch

from torch.utils._python_dispatch import TorchDispatchMode
from dsv3.config import preset
from dsv3.model import Transformer
from dsv3.train.trainer import TrainConfig, compute_losses
name = sys.argv[1]
torch.manual_seed(0)
mc = preset(name).replace(num_nextn_predict_layers=0)
m = Transformer(mc, max_seq_len=128)
w = torch.randint(0, mc.vocab_size, (2, 129))
cfg = TrainConfig(mtp_depth=0)
class Log(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c = collections.Counter(); s.mm = collections.Counter(); s.bytes = 0
    def __torch_dispatch__(s, f, t, a=(), k=None):
        n = f.overloadpacket.__name__
        out = f(*a, **(k or {}))
        if n == "_to_copy":
            s.c[(str(a[0].dtype)[6:], str(out.dtype)[6:])] += 1; s.bytes += a[0].numel() * (a[0].element_size() + out.element_size())
        if n in ("mm", "addmm", "bmm"):
            s.mm[str(a[-2].dtype)[6:] if n == "addmm" else str(a[0].dtype)[6:]] += 1
        return out
with Log() as L:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_losses(m, w, cfg)["loss"]
    loss.backward()
print(json.dumps({"casts": sum(L.c.values()), "by_dir": {f"{a}->{b}": n for (a, b), n in L.c.items()}, "cast_MB": round(L.bytes / 1e6, 1), "gemm_inputs": dict(L.mm)}))
