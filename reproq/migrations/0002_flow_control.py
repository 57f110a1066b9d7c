"""Triggers: the run state machine, and semaphore bookkeeping for lock and concurrency keys."""

from django.db import migrations

STATE_MACHINE = """
CREATE FUNCTION reproq_reject_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'reproq: run % cannot go from % to %', OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation',
              HINT = 'SUCCESSFUL, FAILED, CANCELLED and EXPIRED are final; replay the run instead';
END $$;

CREATE TRIGGER reproq_runs_state_machine
BEFORE UPDATE OF status ON reproq_task_runs
FOR EACH ROW WHEN (
    OLD.status IS DISTINCT FROM NEW.status AND NOT (
        (OLD.status = 'READY' AND NEW.status IN ('WAITING', 'RUNNING', 'EXPIRED', 'CANCELLED'))
        OR (OLD.status = 'WAITING' AND NEW.status IN ('READY', 'CANCELLED', 'EXPIRED'))
        OR (OLD.status = 'RUNNING'
            AND NEW.status IN ('SUCCESSFUL', 'FAILED', 'CANCELLED', 'READY', 'WAITING'))
    )
)
EXECUTE FUNCTION reproq_reject_transition();
"""

SEMAPHORES = """
CREATE FUNCTION reproq_ensure_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reproq_concurrency (key, running, last_grant) VALUES (NEW.sem_key, 0, 0)
    ON CONFLICT (key) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER reproq_runs_ensure_slot
AFTER INSERT OR UPDATE OF sem_key ON reproq_task_runs
FOR EACH ROW WHEN (NEW.sem_key IS NOT NULL)
EXECUTE FUNCTION reproq_ensure_slot();

-- A run left RUNNING (finished, retried, cancelled, reclaimed, released, edited by hand, or
-- deleted): give its slot back and make the next blocked run of the same key READY.
CREATE FUNCTION reproq_release_slot() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    woken text;
BEGIN
    UPDATE reproq_concurrency SET running = GREATEST(running - 1, 0) WHERE key = OLD.sem_key;
    WITH nxt AS (
        SELECT id FROM reproq_task_runs
        WHERE blocked AND status = 'WAITING' AND sem_key = OLD.sem_key
        ORDER BY sort_key LIMIT 1 FOR UPDATE SKIP LOCKED
    )
    UPDATE reproq_task_runs t SET status = 'READY', blocked = false, status_reason = ''
    FROM nxt WHERE t.id = nxt.id
    RETURNING t.queue_name INTO woken;
    IF woken IS NOT NULL THEN
        PERFORM pg_notify('reproq', 'r:' || woken);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER reproq_runs_release_slot
AFTER UPDATE OF status ON reproq_task_runs
FOR EACH ROW WHEN (OLD.status = 'RUNNING' AND NEW.status <> 'RUNNING' AND OLD.sem_key IS NOT NULL)
EXECUTE FUNCTION reproq_release_slot();

CREATE TRIGGER reproq_runs_release_slot_on_delete
AFTER DELETE ON reproq_task_runs
FOR EACH ROW WHEN (OLD.status = 'RUNNING' AND OLD.sem_key IS NOT NULL)
EXECUTE FUNCTION reproq_release_slot();
"""

REVERSE = """
DROP TRIGGER IF EXISTS reproq_runs_state_machine ON reproq_task_runs;
DROP TRIGGER IF EXISTS reproq_runs_ensure_slot ON reproq_task_runs;
DROP TRIGGER IF EXISTS reproq_runs_release_slot ON reproq_task_runs;
DROP TRIGGER IF EXISTS reproq_runs_release_slot_on_delete ON reproq_task_runs;
DROP FUNCTION IF EXISTS reproq_reject_transition();
DROP FUNCTION IF EXISTS reproq_ensure_slot();
DROP FUNCTION IF EXISTS reproq_release_slot();
"""


class Migration(migrations.Migration):
    dependencies = [("reproq", "0001_initial")]

    operations = [
        migrations.RunSQL(STATE_MACHINE + SEMAPHORES, REVERSE),
    ]
