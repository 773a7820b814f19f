"""`python -m orchestrator ...` is the `pairloop` command."""

from orchestrator.cli import main

raise SystemExit(main())
