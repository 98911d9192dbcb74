"""Pre-training: optimizer and schedule, load balancing, training state, the trainer loop."""
