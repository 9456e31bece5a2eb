"""cadenza: a prefork supervisor that lives properly under systemd."""

__version__ = "0.1.0"
