"""`python -m elvis_cli` is the `elvis` command."""

from elvis_cli.cli.app import main

main()
