"""The package's version, in a core module: what the features record (the deploy sidecar, the CLI's ``--version``)
without importing the package face, which re-exports it as ``spyke_lora.__version__``."""

__version__ = "0.1.0"
