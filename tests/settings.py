"""Django settings for the test suite (real PostgreSQL from DATABASE_URL or embedded)."""

import os

from reproq.devdb import database_url, databases_from_url
from tests import pgbouncer

SECRET_KEY = "reproq-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "reproq",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": databases_from_url(database_url())}
if os.environ.get("REPROQ_TEST_DB_NAME"):
    # Child processes started by tests connect to the test database itself.
    DATABASES["default"]["NAME"] = os.environ["REPROQ_TEST_DB_NAME"]
TASKS = {
    "default": {
        "BACKEND": "reproq.backend.ReproqBackend",
        "QUEUES": ["default", "emails", "reports", "other"],
        "OPTIONS": {"MAX_ATTEMPTS": 3, "RETRY_BASE_SECONDS": 0.2, "RETRY_MAX_SECONDS": 2},
    }
}
REPROQ_RUNTIME = {
    "AUTOSTART": False,
    "LEASE_SECONDS": 5,
    "HEARTBEAT_SECONDS": 1,
    "RECLAIM_SECONDS": 1,
    "POLL_FALLBACK_SECONDS": 5,
    "SHUTDOWN_GRACE_SECONDS": 3,
    # Runtimes started inside pytest leave its heap alone; servers the tests spawn turn it on.
    "GC_FREEZE": False,
    # No "nothing started the runtime" timer in the test process (servers the tests spawn keep
    # theirs: tests.servers.child_env).
    "NOT_STARTED_WARNING_SECONDS": 0,
}
if pgbouncer.enabled():
    # Behind PgBouncer in transaction pooling mode (REPROQ_TEST_VIA_PGBOUNCER=1): reproq's one
    # switch, and Django's own (a server-side cursor outlives its transaction). Child processes
    # get the pooler's DATABASE_URL from tests.servers.child_env; this process is pointed at it
    # by tests.conftest after migrating. (The mode leads by the row lease: the advisory lock
    # needs a session and the options startup parameter.)
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    REPROQ_RUNTIME["CONNECTION_MODE"] = "pgbouncer"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"reproq": {"handlers": ["console"], "level": "INFO"}},
}
