"""Tables, plots and reports built from result records; never reads checkpoints."""
