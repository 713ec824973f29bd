"""`python -m tokenline` runs the CLI."""

from tokenline.cli import main

main()
