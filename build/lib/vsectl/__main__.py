"""python -m vsectl (and torchrun -m vsectl)."""

from vsectl.cli import app

app(prog_name="vsectl")
