"""``python -m stablejax demo``: the command line (see :mod:`stablejax._src.demo.cli`)."""

import sys

from stablejax._src.demo.cli import main as main

if __name__ == "__main__":
    sys.exit(main())
