"""URLs to mount with ``path("reproq/", include("reproq.urls"))``."""

from django.urls import path

from . import stats, views
from .asgi import metrics, sse
from .dashboard import views as dashboard

app_name = "reproq"

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("", dashboard.dashboard, name="dashboard"),
    path("snapshot/", dashboard.snapshot_view, name="snapshot"),
    path("action/", dashboard.action, name="action"),
    path("assets/<str:name>", dashboard.asset, name="asset"),
    path("events/", sse.events_view, name="events"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("stats/", stats.stats_view, name="stats"),
]
