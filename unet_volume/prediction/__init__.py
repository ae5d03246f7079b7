"""Prediction at any scale: plan, tasks, the overlap-tile engine, the model on a worker, the run."""
