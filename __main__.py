"""``python -m dejaguard``: the command line."""

from dejaguard.core.cli import main

raise SystemExit(main())
