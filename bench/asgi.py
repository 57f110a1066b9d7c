"""W4's web process: Django (bench.settings, a trivial ``/ping`` view) with reproq's runtime
inside, exactly as ``example_project/asgi.py`` wires it (``reproq.asgi``), started regardless of
``REPROQ_RUNTIME["AUTOSTART"]``: ``uvicorn bench.asgi:application --lifespan on``."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

from reproq.asgi import get_asgi_application

application = get_asgi_application(autostart=True)
