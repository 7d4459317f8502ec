"""`python -m ssvit <command> ...`, the same as the `ssvit` console script."""

from ssvit.cli import main

main()
