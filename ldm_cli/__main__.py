"""`python -m ldm_cli ...` (and `accelerate launch -m ldm_cli ...`) runs the `ldm` command."""

from ldm_cli.cli import main

main()
