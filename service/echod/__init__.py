"""echod: a production-grade TCP echo service (RFC 862)."""

__version__ = "0.1.0"
