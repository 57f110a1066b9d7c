"""Property-based fuzz tests (hypothesis): payloads, cron strings, CLI parsers, HTTP endpoints
and hand-written rows. Profiles: ``ci`` (default, 1,000 examples per target) and ``dev``
(``HYPOTHESIS_PROFILE=dev``, 100)."""
