"""`python -m mae_fast` is the `mae-fast` command (its result files record the command as typed)."""
import sys

from .tools.cli import main

sys.exit(main(prog="python -m mae_fast"))
