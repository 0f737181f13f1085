"""hwnas: hardware-aware compilation and benchmarking for neural architecture search."""

__version__ = "0.1.0"
