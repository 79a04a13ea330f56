"""python -m vsectl (and torchrun -m vsectl)."""

from vsectl.cli import app
from vsectl.runtime import joined_process_group, leave_now

try:
    app(prog_name="vsectl")
except SystemExit as done:
    if joined_process_group():  # a torchrun rank: ended before the interpreter's teardown (see leave_now)
        leave_now(done.code)
    raise
