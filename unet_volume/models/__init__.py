"""The U-Net (one readable file), its configuration, checkpoints, ensembles and the shipped
models."""
