"""Evaluation: generation, judges, task metrics, reports."""
