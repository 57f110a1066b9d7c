"""Settings for benchmark processes: a dedicated database ``reproq_bench`` on the same server."""

import os

from reproq.devdb import database_url, databases_from_url

SECRET_KEY = "reproq-bench"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "bench.urls"  # W4's trivial view (bench/views.py)
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "reproq", "bench"]
DATABASES = {"default": databases_from_url(database_url())}
DATABASES["default"]["NAME"] = os.environ.get("REPROQ_BENCH_DB", "reproq_bench")
TASKS = {"default": {"BACKEND": "reproq.backend.ReproqBackend", "QUEUES": ["default"],
                     "OPTIONS": {"DEDUP_ACTIVE": False}}}
REPROQ_RUNTIME = {"AUTOSTART": False, "CONCURRENCY": 10}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {"version": 1, "disable_existing_loggers": False,
           "loggers": {"django.tasks": {"level": "WARNING"}}}
