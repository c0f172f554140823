"""`free-jax fit-threshold`: fit FREE's threshold estimator to saved agreement data.

    free-jax fit-threshold agreement.npz [--reference] [--unsupervised] [--zeta 0.4] [--plot x.png]

Prints a JSON summary (threshold, parameters, status). Exit status: 0 when the fit succeeded, 1 when
the data were degenerate (the printed threshold is then the fallback), 2 when the file could not be
read.
"""

from __future__ import annotations

import argparse
import json
import sys

from free_jax.errors import InputError


def build_parser(prog: str = "free-jax fit-threshold") -> argparse.ArgumentParser:
    """The argument parser, exposed so the main CLI can mount it as a subcommand."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fit the two-component Beta mixture of FREE's adaptive threshold estimator to "
        "saved (confidence, agree) data and print the threshold.",
    )
    parser.add_argument(
        "path", help=".npz with arrays confidence/agree, or .jsonl with those fields per line"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="the authors' fit: hard labels, 0.5/0.5 weights, moments, 10-point grid",
    )
    parser.add_argument(
        "--unsupervised", action="store_true", help="ignore the agree labels and fit by EM"
    )
    parser.add_argument("--zeta", type=float, default=0.4, help="posterior level (default 0.4)")
    parser.add_argument("--low", type=float, default=0.3, help="search interval start (0.3)")
    parser.add_argument("--high", type=float, default=0.9, help="search interval end (0.9)")
    parser.add_argument(
        "--fallback", type=float, default=0.9, help="threshold when nothing crosses (0.9)"
    )
    parser.add_argument("--plot", default=None, help="write a PNG of the fit to this path")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the subcommand; returns the exit status (see the module docstring)."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs a fit from parsed arguments (shared with the `free-jax` command)."""
    if args.reference and args.unsupervised:
        print("error: --reference needs the agree labels; drop --unsupervised", file=sys.stderr)
        return 2
    # Imported here so `--help` does not pay for importing JAX and TFP.
    from free_jax.threshold import fit_from_file

    try:
        summary = fit_from_file(
            args.path,
            reference=args.reference,
            supervised=not args.unsupervised,
            zeta=args.zeta,
            low=args.low,
            high=args.high,
            fallback=args.fallback,
            plot=args.plot,
        )
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())


def add_parser(sub: argparse._SubParsersAction) -> None:
    template = build_parser("free-jax fit-threshold")
    sub.add_parser(
        "fit-threshold",
        parents=[template],
        add_help=False,
        help="fit the adaptive threshold estimator to saved agreement data",
        description=template.description,
    )
