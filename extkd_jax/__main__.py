"""`python -m extkd_jax ...` is `extkd ...` (the same commands, flags and exit statuses)."""

import sys

from extkd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
