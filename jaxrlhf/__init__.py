"""jaxrlhf: OpenRLHF's alignment toolkit on JAX."""
__version__ = "0.1.0"
