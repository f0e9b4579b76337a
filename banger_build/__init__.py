"""banger-build: declarative, content-addressed builder of microVM root filesystems."""

__version__ = "0.1.0"
