"""Training: losses, DeepSpeed config, jobs and the Ray-free training loop."""
