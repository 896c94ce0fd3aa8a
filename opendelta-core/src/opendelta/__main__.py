"""``python -m opendelta``: the ``opendelta`` command line (see ``opendelta.cli``)."""

import sys

from opendelta.cli import main

if __name__ == "__main__":
    sys.exit(main())
