from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.tasks import Task
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt
async def enqueue_view(request: HttpRequest, name: str) -> JsonResponse:
    """Enqueue `tests.testapp.tasks.<name>` with JSON body {"args": [...], "kwargs": {...}}."""
    import json

    from tests.testapp import tasks

    task = getattr(tasks, name, None)
    if not isinstance(task, Task):
        return JsonResponse({"error": f"no task {name!r}"}, status=404)
    body = json.loads(request.body or b"{}")
    result = await task.aenqueue(*body.get("args", []), **body.get("kwargs", {}))
    return JsonResponse({"id": result.id})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("reproq/", include("reproq.urls")),
    path("enqueue/<str:name>/", enqueue_view),
]
