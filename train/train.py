"""Training entry point, the same as `free-jax train`.

    python train/train.py --config configs/tiny.py [key=value ...]

It uses only free_jax's public API; the logic lives in `free_jax.training`.
"""

import sys

from free_jax import cli

if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
