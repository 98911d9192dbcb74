"""Post-training: SFT on chat data, GRPO on verifiable rewards, distillation from a teacher."""
