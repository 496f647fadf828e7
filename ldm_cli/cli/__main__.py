"""`python -m ldm_cli.cli ...`: the `ldm` command (tests run it so)."""

from ldm_cli.cli import main

main()
