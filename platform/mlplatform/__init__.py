"""mlplatform: train, tune, federate, register and serve models on a laptop or a Ray cluster."""

__version__ = "0.1.0"
