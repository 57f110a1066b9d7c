from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.tasks import Task
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from reproq.exceptions import DatabaseUnavailable


@csrf_exempt
async def enqueue_view(request: HttpRequest, name: str) -> JsonResponse:
    """Enqueue `tests.testapp.tasks.<name>` with JSON body {"args": [...], "kwargs": {...}}."""
    import json

    from tests.testapp import tasks

    task = getattr(tasks, name, None)
    if not isinstance(task, Task):
        return JsonResponse({"error": f"no task {name!r}"}, status=404)
    body = json.loads(request.body or b"{}")
    if body.get("using"):
        task = task.using(**body["using"])
    args, kwargs = body.get("args", []), body.get("kwargs", {})
    try:
        if "count" in body:  # {"count": n}: n runs in one statement (outage and chaos tests)
            results = await task.get_backend().abulk_enqueue(
                [(task, args, kwargs)] * int(body["count"]))
            return JsonResponse({"id": results[0].id, "ids": [r.id for r in results]})
        result = await task.aenqueue(*args, **kwargs)
    except DatabaseUnavailable as exc:  # what an application shows while PostgreSQL is away
        return JsonResponse({"error": str(exc)}, status=503)
    return JsonResponse({"id": result.id})


async def ping_view(request: HttpRequest) -> JsonResponse:
    """A page that needs no database (outage tests: it keeps answering while PostgreSQL is down)."""
    return JsonResponse({"pong": True})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("reproq/", include("reproq.urls")),
    path("enqueue/<str:name>/", enqueue_view),
    path("ping/", ping_view),
]
