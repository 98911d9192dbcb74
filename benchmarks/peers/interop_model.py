"""Print the model directory `make interop` hands to the other engines, training the demo if needed.

    .venv/bin/python benchmarks/peers/interop_model.py [RUN_DIR]      # default: runs/tiny

Reuses ``RUN_DIR/final`` when it is a complete model directory of the servable shape (latent width
kv_lora_rank + qk_rope_head_dim = 576, weights, tokenizer). Otherwise runs the demo, ``dsv3 train``,
into ``RUN_DIR`` -- or, when ``RUN_DIR`` already holds a run of another shape (a checkpoint from
before the presets took the 512 + 64 latent), into ``RUN_DIR-servable``, so an old run is never
overwritten. Only the path goes to stdout (training output goes to stderr), so a Makefile can
capture it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dsv3.bench.peers.vllm import check_servable


def servable_reason(final: Path) -> str | None:
    """Why ``final`` can't be served as it is, or None when it can."""
    if not (final / "config.json").is_file():
        return f"{final} has no config.json"
    try:
        check_servable(final)
    except ValueError as e:
        return str(e)
    if not any((final / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        return f"{final} has no safetensors weights"
    if not (final / "tokenizer.json").is_file():
        return f"{final} has no tokenizer.json"
    return None


def main(argv: list[str]) -> int:
    run = Path(argv[1] if len(argv) > 1 else "runs/tiny")
    reason = servable_reason(run / "final")
    if reason is None:
        print(run / "final")
        return 0
    if run.exists():
        alt = run.with_name(run.name + "-servable")
        print(f"interop: not reusing {run}: {reason}; using {alt}", file=sys.stderr)
        run = alt
        if servable_reason(run / "final") is None:
            print(run / "final")
            return 0
    print(f"interop: training the demo model into {run} (dsv3 train, ~5 min on 2 cores)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "dsv3", "train", "--out", str(run)], stdout=sys.stderr, check=True)
    reason = servable_reason(run / "final")
    if reason:
        print(f"interop: the demo model is not servable: {reason}", file=sys.stderr)
        return 1
    print(run / "final")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
