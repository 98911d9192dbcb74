"""First look at a lent GPU: versions, and which block-scaled FP8 matmul recipes torch accepts."""
import sys
import torch
import triton

print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
M, K, N = 256, 1024, 512
a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
variants = {
    "tensorwise": (torch.tensor(1.0, device="cuda"), torch.tensor(1.0, device="cuda")),
    "rowwise": (torch.ones(M, 1, device="cuda"), torch.ones(1, N, device="cuda")),
    "1x128 x 128x128": (torch.ones(M, K // 128, device="cuda"), torch.ones(N // 128, K // 128, device="cuda")),
    "1x128 x 128x128 (b scale T)": (torch.ones(M, K // 128, device="cuda"), torch.ones(K // 128, N // 128, device="cuda")),
    "1x128 x 1x128": (torch.ones(M, K // 128, device="cuda"), torch.ones(N, K // 128, device="cuda")),
}
for name, (sa, sb) in variants.items():
    for tag, (sa_, sb_) in {"plain": (sa, sb), "sa col-major": (sa.t().contiguous().t() if sa.dim() == 2 else sa, sb)}.items():
        try:
            out = torch._scaled_mm(a, b.t(), scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16)
            ref = a.float() @ b.float().t()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            print(f"_scaled_mm {name:28s} {tag:13s}: OK rel err {err:.2e}")
        except Exception as e:
            print(f"_scaled_mm {name:28s} {tag:13s}: FAIL {type(e).__name__}: {str(e).splitlines()[0][:150]}")
try:
    from torch.nn.functional import scaled_mm, ScalingType, SwizzleType  # newer API
    print("torch.nn.functional.scaled_mm available")
except Exception as e:
    print("F.scaled_mm:", type(e).__name__, str(e)[:100])
