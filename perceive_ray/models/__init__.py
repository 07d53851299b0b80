"""Model loaders (real checkpoints and tiny random-init ones through the same code), heads, converters."""
