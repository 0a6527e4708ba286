"""KV-cache generation: `cache` fixes the shapes of a generation against the mesh, `loop` prefills and
decodes, `sampling` picks each token, `command` is `lwm-jax generate` as a library call.
"""

from lwm_jax.generate.cache import CacheSpec, cache_spec, device_memory_bytes
from lwm_jax.generate.command import encode_prompt, generate_command
from lwm_jax.generate.loop import check_prompt, decode, generate, place_model, prefill
from lwm_jax.generate.sampling import check_sampling, pick_token

__all__ = ["CacheSpec", "cache_spec", "check_prompt", "check_sampling", "decode", "device_memory_bytes",
           "encode_prompt", "generate", "generate_command", "pick_token", "place_model", "prefill"]
