"""Where a training step's time goes, per precision: ``dsv3 bench profile-train``.

One step is the trainer's own: :func:`dsv3.train.trainer.compute_losses` (fused head +
cross-entropy, MTP, balance losses) under :func:`dsv3.train.precision.autocast`, backward, gradient
clipping, the trainer's AdamW (:func:`dsv3.train.optim.build_optimizer`) and ``zero_grad``. After
warm-up steps, ``steps`` timed steps run under ``torch.profiler`` and every ATen op's self time is put in a
category (:data:`CATEGORIES`): GEMMs, attention, dtype casts and copies, reductions/norm math,
elementwise (the AdamW update's in-place ops among them), indexing (the expert dispatch), everything
else; the forward, backward and optimizer phases are timed separately (wall clock). Comparing the table of
bf16 with fp32's says what bf16 autocast adds besides the GEMMs it makes cheaper: a cast that
happens every step for every expert, an op autocast leaves in fp32, a second copy of an activation.
"""

from __future__ import annotations

import time

import torch

from ..config import ModelConfig
from ..config import preset as get_preset
from .machine import machine_info, resolve_device, sync, torch_threads

# (category, op names) in match order; an op not named here is "other". Names without the "aten::" prefix.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemm", ("mm", "addmm", "bmm", "baddbmm", "addbmm", "_grouped_mm", "linear", "matmul")),
    ("attention", ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_flash_attention", "_flash_attention_forward", "_flash_attention_backward",
                   "_scaled_dot_product_efficient_attention", "_efficient_attention_forward",
                   "_efficient_attention_backward", "_scaled_dot_product_flash_attention_backward")),
    ("cast/copy", ("_to_copy", "copy_", "to", "clone", "contiguous", "_copy_from", "_copy_from_and_resize")),
    ("index/dispatch", ("index_select", "index_add_", "index_add", "scatter_add_", "scatter_", "gather", "argsort",
                        "sort", "bincount", "split_with_sizes", "unbind", "stack", "cat", "index", "index_put_",
                        "embedding", "embedding_dense_backward", "topk", "masked_fill", "where", "nonzero",
                        "_index_put_impl_", "zeros", "zero_", "fill_", "empty", "new_zeros")),
    ("reduction/norm", ("mean", "sum", "pow", "rsqrt", "_log_softmax", "_log_softmax_backward_data", "log_softmax",
                        "softmax", "_softmax", "_softmax_backward_data", "logsumexp", "exp", "max", "amax",
                        "nll_loss_forward", "nll_loss_backward", "nll_loss", "cross_entropy_loss", "sigmoid",
                        "sigmoid_backward", "linalg_vector_norm", "norm", "_foreach_norm")),
    ("elementwise", ("mul", "add", "add_", "mul_", "div", "div_", "sub", "rsub", "neg", "silu", "silu_backward",
                     "cos", "sin", "mul_out", "addcmul", "clamp", "abs", "sign", "ones_like",
                     "zeros_like", "expand", "view", "reshape", "transpose", "t", "permute", "narrow", "slice",
                     "select", "unsqueeze", "squeeze", "flatten", "_unsafe_view", "as_strided", "detach")),
)
_CATEGORY_OF = {}
for _cat, _names in CATEGORIES:
    for _n in _names:
        _CATEGORY_OF.setdefault(_n, _cat)


def op_category(name: str) -> str:
    """The :data:`CATEGORIES` entry of profiler op ``name`` (``aten::mm`` -> ``gemm``); ``other`` if none."""
    short = name.split("::", 1)[1] if name.startswith("aten::") else name
    return _CATEGORY_OF.get(short, "other")


def _step_fn(model, cfg, window: torch.Tensor, device: torch.device, phases: dict[str, float]):
    """The trainer's step on ``window``; adds each phase's wall seconds to ``phases``."""
    from ..train.optim import build_optimizer
    from ..train.precision import autocast
    from ..train.trainer import compute_losses

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)

    def step() -> float:
        t0 = time.perf_counter()
        with autocast(device, cfg.dtype):
            loss = compute_losses(model, window, cfg)["loss"]
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        for k, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
            phases[k] = phases.get(k, 0.0) + dt
        return float(loss.detach())

    return step


def profile_train_step(preset: str = "small", batch_size: int = 2, seq_len: int = 128, dtypes=("fp32", "bf16"),
                       threads: int | None = 1, steps: int = 2, warmup: int = 1, seed: int = 0,
                       config: ModelConfig | None = None, device: str | None = None, top: int = 25) -> dict:
    """Profile ``steps`` training steps per dtype in ``dtypes`` (each a TrainConfig ``dtype``) on the
    same model, weights and batch; returns ``{"runs": {dtype: {"step_s", "total_ms", "categories" {cat:
    ms}, "casts" (calls of aten::_to_copy), "top" [[op, calls, self ms]]}}, "machine", ...}`` (per step)."""
    from ..model import Transformer
    from ..train.trainer import TrainConfig

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    mc = (config if config is not None else get_preset(preset)).replace(num_nextn_predict_layers=0)
    dev = resolve_device(device)
    runs = {}
    with torch_threads(threads):
        torch.manual_seed(seed)
        with dev:
            base = Transformer(mc, max_seq_len=seq_len)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        window = torch.randint(0, mc.vocab_size, (batch_size, seq_len + 1),
                               generator=torch.Generator().manual_seed(seed)).to(dev)
        for dtype in dtypes:
            base.load_state_dict(state)       # every dtype starts from the same weights
            cfg = TrainConfig(dtype=dtype, seq_aux_alpha=1e-4, mtp_depth=0)
            phases: dict[str, float] = {}
            step = _step_fn(base, cfg, window, dev, phases)
            for _ in range(warmup):
                step()
            phases.clear()
            # The timed steps are the profiled ones: the profiler's cost (microseconds per op) is
            # small next to a step, and a second pass would double the time of a slow bf16 step.
            activities = [torch.profiler.ProfilerActivity.CPU]
            if dev.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(dev)
                step_s = (time.perf_counter() - t0) / steps
            phase_ms = {k: 1e3 * v / steps for k, v in phases.items()}
            runs[dtype] = {"phase_ms": phase_ms,
                           **_summarize(prof.key_averages(), steps, step_s, top, device_time=dev.type == "cuda")}
        threads_used = torch.get_num_threads()
    return {"benchmark": "profile_train_step", "preset": "custom" if config is not None else preset,
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup,
            "machine": machine_info(threads_used, dev), "runs": runs}


def _summarize(averages, steps: int, step_s: float, top: int, device_time: bool = False) -> dict:
    """Per-step ms by category and the top ops, from self times: the host's on CPU, the device's
    (kernel time) when ``device_time``."""
    cats: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
    cats["other"] = 0.0
    rows = []
    casts = 0
    for e in averages:
        if not e.key.startswith("aten::"):
            continue              # autograd nodes and profiler scopes: their ops are counted as ATen ops
        ms = (e.self_device_time_total if device_time else e.self_cpu_time_total) / 1e3 / steps
        cats[op_category(e.key)] += ms
        rows.append((e.key, e.count // steps, ms))
        if e.key == "aten::_to_copy":
            casts = e.count // steps
    rows.sort(key=lambda r: -r[2])
    return {"step_s": step_s, "total_ms": sum(cats.values()), "categories": cats, "casts": casts,
            "top": [list(r) for r in rows[:top]]}


def format_profile_train(r: dict) -> str:
    """Per-category milliseconds per step, one column per dtype, then each dtype's top ops."""
    m = r["machine"]
    names = list(r["runs"])
    lines = [f"training step profile: preset {r['preset']}, batch {r['batch_size']} x {r['seq_len']}, "
             f"{m['threads']} thread(s), {m.get('cpu_model') or m.get('cpu')}, bf16 units: "
             f"{', '.join(m.get('bf16_units') or []) or 'none'}", ""]
    head = f"  {'category':<16}" + "".join(f"{n + ' ms':>12}" for n in names)
    lines.append(head)
    cats = list(next(iter(r["runs"].values()))["categories"])
    for c in cats:
        lines.append(f"  {c:<16}" + "".join(f"{r['runs'][n]['categories'][c]:>12.1f}" for n in names))
    lines.append(f"  {'ops total':<16}" + "".join(f"{r['runs'][n]['total_ms']:>12.1f}" for n in names))
    lines.append(f"  {'step (wall)':<16}" + "".join(f"{1e3 * r['runs'][n]['step_s']:>12.1f}" for n in names))
    for ph in ("forward", "backward", "optimizer"):
        lines.append(f"  {ph + ' (wall)':<16}" + "".join(f"{r['runs'][n]['phase_ms'][ph]:>12.1f}" for n in names))
    lines.append(f"  {'_to_copy calls':<16}" + "".join(f"{r['runs'][n]['casts']:>12d}" for n in names))
    for n in names:
        lines += ["", f"  top ops, {n} (self ms per step, calls per step):"]
        for op, calls, ms in r["runs"][n]["top"]:
            lines.append(f"    {op:<56} {ms:>9.2f} {calls:>7d}  {op_category(op)}")
    return "\n".join(lines)
