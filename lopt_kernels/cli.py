"""Command-line entry point: ``lopt-kernels compare ...``."""

from __future__ import annotations

import sys

from .compare import CompareError, build_parser, compare_main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            return compare_main(args)
    except CompareError as exc:
        print(f"lopt-kernels: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
