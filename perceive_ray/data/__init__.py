"""Dataset layer: benchmark adapters, the Manifest schema, the synthetic generator; imports no Ray."""
