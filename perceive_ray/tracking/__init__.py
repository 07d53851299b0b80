"""Run tracking: the Tracker protocol (MLflow on rank 0 only) and the run record (config, versions, hashes)."""
