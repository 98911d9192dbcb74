"""Profile one training step of the `small` preset on a GPU (bf16 autocast): where does the time go?

Prints tokens/s and the top ops by device time and by host time. Run: PYTHONPATH=src python3 benchmarks/gpu/profile_train.py
"""
import time

import torch
import torch.nn.functional as F

from dsv3 import Transformer, preset

torch.manual_seed(0)
cfg = preset("small")
cfg.num_nextn_predict_layers = 0
model = Transformer(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
B, S = 8, 1024
ids = torch.randint(0, cfg.vocab_size, (B, S + 1), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(5):
    step()
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 5
print(f"small preset, batch {B}x{S}: {dt * 1e3:.1f} ms/step, {B * S / dt:,.0f} tokens/s")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
print(ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=50))
