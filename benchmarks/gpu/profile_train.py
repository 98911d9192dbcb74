"""Profile one training step of the `small` preset on a GPU: where does the time go, bf16 vs fp32?

The library code is dsv3.bench.profile_train (also `dsv3 bench profile-train --device cuda`): the
trainer's own step per precision, kernel time by op category and the top ops.
Run: PYTHONPATH=src python3 benchmarks/gpu/profile_train.py   (JSON to $OUT/profile_train.json if OUT is set)
"""
import json
import os

from dsv3.bench.profile_train import format_profile_train, profile_train_step

result = profile_train_step("small", batch_size=8, seq_len=1024, dtypes=("bf16", "fp32"), threads=None, steps=3,
                            warmup=3, device="cuda", top=18)
print(format_profile_train(result))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "profile_train.json"), "w") as f:
        json.dump(result, f, indent=2)
