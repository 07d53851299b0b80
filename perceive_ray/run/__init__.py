"""The only layer that imports Ray: Ray Data inference, Ray Train jobs, Ray Tune sweeps, cluster helpers."""
