"""reproq: Postgres-only background tasks for Django 6, with the worker inside the ASGI server."""

__version__ = "0.1.0"
