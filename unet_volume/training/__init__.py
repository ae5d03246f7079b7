"""Training from few images: sampling, augmentation, weight maps, the loop and how it starts."""
