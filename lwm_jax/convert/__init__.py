"""Conversion between lwm-jax checkpoints and Hugging Face (safetensors) / GGUF files."""
