"""Training: loss, train state, optimizer, the jitted sharded step, checkpoints, the loop."""
