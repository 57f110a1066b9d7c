"""Pytest plugin loaded first: use DATABASE_URL, or start a throwaway embedded PostgreSQL."""

from reproq.devdb import database_url

database_url(temporary=True)
