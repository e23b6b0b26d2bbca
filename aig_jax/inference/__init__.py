"""Inference that really skips the residual branches whose gate is 0."""
