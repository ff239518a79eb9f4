"""``python -m app.demo``: see ``app.demo.cli``."""

from app.demo.cli import main

raise SystemExit(main())
