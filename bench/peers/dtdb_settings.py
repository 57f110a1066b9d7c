"""Django settings of the django-tasks-db peer (its own database, its own tiny app)."""

import os
from urllib.parse import unquote, urlsplit

_url = urlsplit(os.environ.get("BENCH_DB_URL", "postgresql://postgres@127.0.0.1:5432/bench_dtdb"))

SECRET_KEY = "reproq-bench-dtdb"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django_tasks_db"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(_url.path.lstrip("/")),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": unquote(_url.hostname or ""),
        "PORT": str(_url.port or ""),
        # Persistent connections, as a production worker would run: with Django's default
        # (0) db_worker opens a new connection, i.e. a new PostgreSQL backend, for every poll.
        "CONN_MAX_AGE": 600,
        "CONN_HEALTH_CHECKS": True,
    }
}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "bench.peers.web"
LOGGING = {"version": 1, "disable_existing_loggers": False,
           "loggers": {"django.tasks": {"level": "WARNING"},
                       "django_tasks_db": {"level": "WARNING"}}}
