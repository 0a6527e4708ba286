"""Content digests: the device and host digests agree bit for bit (sharded or not), a changed bit
changes them, and a model checkpoint with damaged bytes fails to load with one line naming it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwm_jax.config import MeshConfig, ModelConfig
from lwm_jax.errors import UserError
from lwm_jax.model.digest import host_digest, tree_digests
from lwm_jax.model.llama import Llama
from lwm_jax.model.store import PENDING, iter_params, model_metadata, restore_params, save_model
from lwm_jax.parallel.mesh import make_mesh

TINY = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, bos_token_id=1, eos_token_id=(2,))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int32, np.uint8])
def test_device_and_host_digests_agree(dtype):
    x = (np.random.default_rng(0).standard_normal((16, 24, 40)) * 50).astype(dtype)
    mesh = make_mesh(MeshConfig(dp=2, sp=4))
    sharded = jax.device_put(x, NamedSharding(mesh, P("dp", "sp", None)))
    digests = tree_digests({"x": sharded, "y": jnp.asarray(x)})
    assert digests["['x']"] == digests["['y']"] == host_digest(np.asarray(x))


def test_one_flipped_bit_or_swapped_pair_changes_the_digest():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[500] ^= 1 << 7
    swapped = x.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert len({tuple(host_digest(a)) for a in (x, flipped, swapped)}) == 3


def _damage_params(ckpt):
    target = max((p for p in (ckpt / "0" / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)
    with target.open("r+b") as f:
        f.seek(target.stat().st_size // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())


def test_damaged_model_checkpoint_is_caught_on_every_read(tmp_path):
    model = Llama(TINY, nnx.Rngs(0))
    ckpt = save_model(tmp_path / "ckpt", model, model_metadata(TINY))
    assert restore_params(ckpt, TINY)["embed_tokens"].shape == (256, 32)  # intact: reads back
    _damage_params(ckpt)
    for read in (lambda: restore_params(ckpt, TINY), lambda: list(iter_params(ckpt, TINY))):
        with pytest.raises(UserError, match=rf"checkpoint {ckpt / '0' / 'params'} is (damaged|damaged or unreadable)"):
            read()


def test_unfinished_lazy_checkpoint_is_refused(tmp_path):
    model = Llama(TINY, nnx.Rngs(0))
    ckpt = save_model(tmp_path / "ckpt", model, model_metadata(TINY))
    meta_file = ckpt / "0" / "metadata" / "metadata"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "digests": PENDING}))
    with pytest.raises(UserError, match="was never finished"):
        restore_params(ckpt, TINY)
