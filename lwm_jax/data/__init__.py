"""Long-context training data: SlimPajama-format sources, tokenization, packing, per-source mixture,
a resumable multi-host grain pipeline, synthetic long-context tasks and an offline demo corpus.

Submodules are imported on use (no JAX or grain import happens on `import lwm_jax.data`).
"""
