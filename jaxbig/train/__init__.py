"""Train state, steps, metrics and the loop."""
