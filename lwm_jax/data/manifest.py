"""The manifest of a prepared dataset (`manifest.json`): seq_len, tokenizer hash, seed, per-source
documents/tokens/sequences and shard files, skipped-input counts. Written last by `prepare`, so a
folder without one is an unfinished run; read and checked by the training pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lwm_jax.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "lwm-jax-prepared"
VERSION = 1


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Writes `manifest.json` atomically (temporary file, then rename)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | Path) -> dict:
    """The checked manifest of a prepared dataset, with shard paths made absolute."""
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    if not directory.is_dir():
        raise UserError(f"prepared dataset {directory} does not exist (make it with `lwm-jax data prepare`)")
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}: not a prepared dataset, or `lwm-jax data prepare` "
                        "did not finish there")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not "
                        f"{FORMAT!r} version {VERSION}; re-run `lwm-jax data prepare`")
    for name, source in manifest["sources"].items():
        shards = [str(directory / s) for s in source["shards"]]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise UserError(f"prepared dataset {directory}: shard {missing[0]} of source {name!r} is missing")
        source["shard_paths"] = shards
    return manifest
