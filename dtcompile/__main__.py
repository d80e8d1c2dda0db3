"""`python -m dtcompile` runs the dtc command line."""

import sys

try:
    from dtcompile.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line itself loads: no traceback either
    sys.stderr.write("interrupted\n")
    sys.exit(130)

main()
