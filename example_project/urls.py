from django.contrib import admin
from django.urls import include, path

from .demo import views

urlpatterns = [
    path("", views.home, name="home"),
    path("enqueue/", views.enqueue, name="enqueue"),
    path("results/<str:result_id>/", views.result, name="result"),
    path("admin/", admin.site.urls),
    path("reproq/", include("reproq.urls")),
]
