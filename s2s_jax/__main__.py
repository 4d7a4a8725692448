import sys

from s2s_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
