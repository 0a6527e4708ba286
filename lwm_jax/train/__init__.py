"""Training: loss, optimizer, train step, orbax checkpoints and the stage runner."""
