"""Train state, steps, the set-up the loop and the planner share (`setup.build`), the loop, the planner and metrics."""
