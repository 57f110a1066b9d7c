"""The trivial view of W4 (the same in every system's web process)."""

from django.http import HttpResponse


async def ping(request):
    return HttpResponse(b"ok", content_type="text/plain")
