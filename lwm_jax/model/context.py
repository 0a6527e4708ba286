"""The one rule for inputs longer than a checkpoint was trained on, shared by every command that feeds
a checkpoint tokens (`generate`, `eval ppl|niah|passkey|ruler`, `theta-sweep`).

Past the checkpoint's `max_position_embeddings` the model still runs (RoPE angles are exact up to
MAX_POSITIONS), but it extrapolates: a warning on stderr. An error only where a result would be
meaningless: positions RoPE cannot represent, and a length past the command's own hard limit (the
retrieval probes' `--max-length`, which defaults to the trained length).
"""

from __future__ import annotations

from lwm_jax.errors import UserError
from lwm_jax.progress import log

# rope_angles takes positions as uint32 (fixed-point turns): position 2^32 wraps to position 0.
MAX_POSITIONS = 2**32


def check_context(length: int, trained: int, *, what: str, limit: int | None = None, warn: bool = True) -> bool:
    """Checks `length` tokens (`what` names them in the message) against a checkpoint trained at
    `trained` tokens; returns True when the input is past the trained length (and warns, unless
    `warn` is False).

    UserError past MAX_POSITIONS, or past `limit` when given (a command's hard limit).
    """
    if length > MAX_POSITIONS:
        raise UserError(f"{what}={length:,} tokens is past the {MAX_POSITIONS:,} positions RoPE can represent "
                        "(positions are uint32)")
    if limit is not None and length > limit:
        default = " (the checkpoint's max_position_embeddings)" if limit == trained else ""
        raise UserError(f"{what}={length:,} is beyond what this model/mesh holds: max_length={limit:,}{default}; "
                        "pass --max-length N to evaluate past it (the model then extrapolates)")
    if length <= trained:
        return False
    if warn:
        log(f"lwm-jax: warning: {what}={length:,} tokens is past the checkpoint's trained length "
            f"(max_position_embeddings={trained:,}); the model extrapolates there")
    return True
