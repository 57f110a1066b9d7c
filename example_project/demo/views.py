"""Async views: enqueue with ``aenqueue`` and read results with ``aget_result``."""

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.tasks.exceptions import TaskResultDoesNotExist
from django.template.response import TemplateResponse

from reproq.models import TaskRun

from . import tasks

TASKS = {
    "email": (tasks.send_welcome_email, lambda n: (f"user{n}@example.com",)),
    "preview": (tasks.fetch_preview, lambda n: (f"https://example.com/{n}",)),
    "report": (tasks.build_report, lambda n: (50_000 + n,)),
    "flaky": (tasks.flaky, lambda n: (0.5,)),
}


async def home(request: HttpRequest) -> HttpResponse:
    runs = [run async for run in TaskRun.objects.order_by("-id")[:30]]
    return TemplateResponse(request, "demo/home.html", {"runs": runs, "kinds": sorted(TASKS)})


async def enqueue(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return JsonResponse({"error": "POST a form with kind and count"}, status=405)
    kind = request.POST.get("kind", "")
    if kind not in TASKS:
        return JsonResponse({"error": f"kind must be one of {sorted(TASKS)}"}, status=400)
    try:
        count = int(request.POST.get("count", "1"))
    except ValueError:
        return JsonResponse({"error": "count must be a whole number"}, status=400)
    if not 1 <= count <= 1000:
        return JsonResponse({"error": "count must be between 1 and 1000"}, status=400)
    task, make_args = TASKS[kind]
    ids = [(await task.aenqueue(*make_args(n))).id for n in range(count)]
    if request.headers.get("Accept") == "application/json":
        return JsonResponse({"ids": ids})
    return redirect("home")


async def result(request: HttpRequest, result_id: str) -> JsonResponse:
    backend = tasks.flaky.get_backend()
    try:
        res = await backend.aget_result(result_id)
    except TaskResultDoesNotExist:
        return JsonResponse({"error": "no such result"}, status=404)
    body = {
        "id": res.id, "task": res.task.module_path, "status": res.status,
        "raw_status": res.raw_status, "attempts": res.attempts, "metadata": res.metadata,
        "errors": [e.exception_class_path for e in res.errors],
    }
    if res.raw_status == "SUCCESSFUL":
        body["return_value"] = res.return_value
    return JsonResponse(body)
