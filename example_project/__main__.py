"""``python -m example_project`` (or ``./dev demo``): migrate, then serve on 127.0.0.1:8000 with
uvicorn; the reproq runtime starts inside the server. Uses DATABASE_URL, or an embedded
PostgreSQL kept under ~/.cache/reproq/pgdata when it is unset."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m example_project")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from reproq.devdb import database_url

    database_url()  # starts the embedded server once, for this process and the server workers
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    call_command("demo_admin")
    print(f"reproq demo: http://{args.host}:{args.port}/  (admin: /admin/, login demo / demo)",
          file=sys.stderr)
    import uvicorn

    uvicorn.run("example_project.asgi:application", host=args.host, port=args.port,
                workers=args.workers, lifespan="on", timeout_graceful_shutdown=5,
                log_level="info")


if __name__ == "__main__":
    main()
