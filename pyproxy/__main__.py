"""`python -m pyproxy` is the `pyproxy` command."""

from pyproxy.cli import main

raise SystemExit(main())
