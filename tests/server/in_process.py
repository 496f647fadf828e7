"""The `ldm` command line run in the test's own process: a server test has imported torch
already, and a subprocess would import it again (10 s on a busy 2-core machine)."""

from __future__ import annotations

from pathlib import Path


def ldm_files(out: Path, *args: str) -> list[Path]:
    """Run the `ldm` command line in this process (the server has imported torch already; a
    subprocess would import it again) and return the PNGs it wrote."""
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    # LDM_MALLOC=default: the command's allocator tuning is process-wide; not in pytest's
    result = CliRunner().invoke(app, [*args, "-o", str(out)], env={"LDM_MALLOC": "default"})
    assert result.exit_code == 0, result.output
    return [Path(line) for line in result.stdout.splitlines() if line.endswith(".png")]
