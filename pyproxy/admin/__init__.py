"""Kong's Admin API for stream entities (`admin_listen`), kept in a Kong declarative file
(`admin_state`), or in PostgreSQL for a fleet. See docs/kong.md, "Admin API".

- entities.py: the entities' fields and Kong's defaults, Kong's error bodies;
- state.py: `StateFile`, the entities as a declarative document: each change loaded as the next
  reload will load it, then written atomically;
- database.py: `DatabaseState`, the same kept in PostgreSQL and followed by a fleet (imported only
  with `admin_state: postgres://…`);
- api.py: `AdminAPI`, Kong's paths and methods answered from the state;
- server.py: `AdminProcess` (the master's side) and the process that serves HTTP.
"""

from .server import AdminProcess

__all__ = ["AdminProcess"]
