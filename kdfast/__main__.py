"""``python -m kdfast``: the command line (kdfast.cli.main)."""
import sys

from kdfast.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
