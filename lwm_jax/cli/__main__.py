"""`python -m lwm_jax.cli`: the `lwm-jax` command (what the `--aot` plan workers and the tests start)."""

import sys

from lwm_jax.cli import main

sys.exit(main())
