"""The ``kdfast`` command line (also ``python -m kdfast``)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fast knowledge distillation for CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, the torch it was built against, compiled kernels per op")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        print(info.render())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
