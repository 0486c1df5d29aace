"""The runtime: CLI, training, evaluation, checkpoints."""
