"""Evaluation: perplexity on held-out text, accuracy on verifiable tasks, lm-eval through the server."""
