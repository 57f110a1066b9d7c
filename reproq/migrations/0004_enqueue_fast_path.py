"""Cheaper one-by-one enqueue: dashboard events without WAL, and a run-id sequence by name.

- ``reproq_events`` becomes UNLOGGED. It only feeds the live dashboard, the SSE replay and the
  throughput of the last minutes; every enqueue writes one row to it, and WAL for that row was
  about a tenth of a single enqueue's cost. After a PostgreSQL crash (not a clean restart) the
  table comes back empty: the dashboard loses minutes of history, never task state. Its id
  sequence stays logged, so event ids keep growing across a crash and SSE clients resume.
- The runs' id sequence is made sure to be called ``reproq_task_runs_id_seq`` (the name
  PostgreSQL gives it), so ENQUEUE can name it instead of looking it up in the catalogs on
  every call.
"""

from django.db import migrations

FORWARD = """
ALTER TABLE reproq_events SET UNLOGGED;
DO $$
DECLARE
    events_seq text := pg_get_serial_sequence('reproq_events', 'id');
    runs_seq text := pg_get_serial_sequence('reproq_task_runs', 'id');
BEGIN
    IF events_seq IS NOT NULL THEN
        EXECUTE format('ALTER SEQUENCE %s SET LOGGED', events_seq);
    END IF;
    IF runs_seq IS NOT NULL
       AND runs_seq::regclass IS DISTINCT FROM to_regclass('reproq_task_runs_id_seq') THEN
        EXECUTE format('ALTER SEQUENCE %s RENAME TO reproq_task_runs_id_seq', runs_seq);
    END IF;
END
$$;
"""

REVERSE = "ALTER TABLE reproq_events SET LOGGED;"


class Migration(migrations.Migration):

    dependencies = [
        ('reproq', '0003_events'),
    ]

    operations = [
        migrations.RunSQL(FORWARD, REVERSE),
    ]
