"""The Flax NNX Llama-3 model and its rotary position embedding."""
