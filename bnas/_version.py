"""The package version, in a leaf module so any bnas module can read it without importing
the package root (which imports nearly everything)."""

__version__ = "0.1.0"
