"""lwm-jax: progressive RoPE-theta context extension for Llama-3 with ring attention on JAX."""

__version__ = "0.1.0"
