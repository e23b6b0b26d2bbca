"""Training: state, optimiser and learning-rate schedule, losses, the train step and loop."""
