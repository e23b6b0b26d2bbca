"""Evaluation: predictions, evaluators, calibration, attacks, the report and its plots."""
