"""authopt: the API package (`authopt.v1`, generated), the typed client and the `authopt` command."""

__version__ = "0.1.0"
