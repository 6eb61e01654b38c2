"""Kong compatibility: Kong's declarative configuration (kong.yml) as a configuration source.

`KongDeclarative` (source.py) reads the file and hands it to `Translator` (translate.py), which
rewrites it in pyproxy's own schema for the one validator; docs/kong.md says what is read and what
is ignored.
"""

from .source import KongDeclarative

__all__ = ["KongDeclarative"]
