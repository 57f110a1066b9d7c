"""An example Django project: async views enqueue tasks that run inside the same ASGI server."""
