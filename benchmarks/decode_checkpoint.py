"""Write a random-weight preset checkpoint with a tokenizer, for ``dsv3 bench decode --peer ...``.

    PYTHONPATH=src python benchmarks/decode_checkpoint.py OUT_DIR [--preset small] [--seed 0]

The weights are the model's own initialisation (``Transformer(preset(...))``, seeded); the tokenizer
is a small byte-level BPE trained on this repository's Python sources (the GGUF export pads its
vocabulary to the model's, and the benchmark's prompts are token ids anyway). The decode speed of
a model does not depend on what its weights learned, only on its shape and precision; its greedy
tokens do, and random weights sit near ties, so peers' greedy agreement on such a checkpoint is
reported, not expected.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dsv3
from dsv3.config import preset
from dsv3.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-vocab", type=int, default=2048)
    args = ap.parse_args()

    cfg = preset(args.preset)
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "src").rglob("*.py"))]
    tok = train_tokenizer(texts, vocab_size=min(args.tokenizer_vocab, cfg.vocab_size))
    torch.manual_seed(args.seed)
    model = dsv3.Transformer(cfg)
    dsv3.save_pretrained(model, args.out)
    tok.save(args.out)
    print(f"{args.out}: {args.preset} preset, {model.num_params(include_mtp=False) / 1e6:,.1f}M parameters "
          f"(random, seed {args.seed}), tokenizer of {tok.vocab_size} ids")


if __name__ == "__main__":
    main()
