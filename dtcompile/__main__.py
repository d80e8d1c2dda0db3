"""`python -m dtcompile` runs the dtc command line."""

from dtcompile.cli import main

main()
