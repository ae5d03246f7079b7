"""Scores of a prediction against labels: pixel error, Rand error, variation of information."""
