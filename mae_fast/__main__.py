"""`python -m mae_fast` is the `mae-fast` command."""
import sys

from .tools.cli import main

sys.exit(main())
