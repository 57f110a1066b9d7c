"""URLs to mount with ``path("reproq/", include("reproq.urls"))``."""

from django.urls import path

from . import views

app_name = "reproq"

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
]
