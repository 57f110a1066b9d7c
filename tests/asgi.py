"""ASGI entry point of the test project, served by the real servers in tests/test_servers.py."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import reproq.asgi

application = reproq.asgi.get_asgi_application()
