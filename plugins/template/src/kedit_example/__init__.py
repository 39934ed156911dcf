"""kedit-example: a template editor plugin."""

__version__ = "0.1.0"
