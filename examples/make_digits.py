"""Write the built-in digits example: COCO annotations with known label errors, and images.

    python examples/make_digits.py --out runs/digits-data --images 150 --seed 0

Prints where each file went. See examples/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kfold_ray.data._example import make_digits_example
from kfold_ray._exceptions import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the digits example dataset (handwritten digits on a canvas, "
        "with about 10% of the images carrying one injected label error)."
    )
    parser.add_argument("--out", type=Path, default=Path("runs/digits-data"),
                        help="folder to write into (default: %(default)s)")
    parser.add_argument("--images", type=int, default=150,
                        help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--corrupt-fraction", type=float, default=0.1,
                        help="share of images given one label error (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        ex = make_digits_example(args.out, n_images=args.images, seed=args.seed,
                                 corrupt_fraction=args.corrupt_fraction)
    except ConfigError as err:
        print(f"make_digits: {err}", file=sys.stderr)
        return 2
    print(f"annotations (with injected errors): {ex.annotations_path}")
    print(f"images:                             {ex.image_dir}")
    print(f"injected errors (answer key):       {ex.injected_errors_path}")
    print(f"clean annotations:                  {ex.clean_annotations_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
