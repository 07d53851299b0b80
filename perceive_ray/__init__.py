"""perceive_ray: reproduce and scale the CLIP-vs-MLLM perception study on Ray (data, train, tune) and MLflow."""

__version__ = "0.1.0"
