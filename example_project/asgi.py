"""ASGI entry point: Django with the reproq runtime inside (uvicorn/hypercorn/granian/daphne)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

from reproq.asgi import get_asgi_application

application = get_asgi_application()
