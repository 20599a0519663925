"""`python -m probe ...`: the same command line as the `probe` script."""

from probe.cli import app

app(prog_name="probe")
