"""The live dashboard: HTML page, JSON snapshot, operator actions, admin helpers.

`views` serves ``/reproq/`` (the page), ``/reproq/snapshot/`` (what the page re-reads when
events arrive), ``/reproq/action/`` (retry, replay, cancel, pause, resume) and the page's
assets; `ops` holds replay; `adminkit` the admin's estimated paginator and index-friendly
filters. The numbers come from `reproq.stats`, the live events from `reproq.asgi.sse`.
"""
