"""fasweep: sweeps for asymmetric backpropagation (feedback alignment) on Ray, tracked in MLflow."""

__version__ = "0.1.0"
