"""Entry point of the frozen binary: the same CLI as `appliance` from a source install."""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
