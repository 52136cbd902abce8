"""pctop: watch post-copy migration stalls on Linux/KVM, live."""

__version__ = "0.1.0"
