"""Workflows: runs that wait for upstream runs (chains, groups with a callback).

A dependent run is WAITING with run_after = 9999-12-31 and pending_deps > 0. When an upstream run
(has_dependents) reaches a final state, a trigger in the same transaction either counts one
success down on each of its WAITING dependents — the last one makes the dependent READY,
handing it the upstream results when it asked for them, and NOTIFYs its queue — or, when the
upstream ended in any other way (or was deleted), cancels its WAITING dependents, which in turn
cancels theirs. Row locks on the dependent serialise concurrent upstream completions, so a
callback is released exactly once, however many processes finish its group at once.
"""

from django.db import migrations, models


RELEASE_DEPENDENTS = """
CREATE FUNCTION reproq_release_dependents() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    up reproq_task_runs%ROWTYPE;
    succeeded boolean;
    released bigint[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        up := OLD;
        succeeded := false;
    ELSE
        up := NEW;
        succeeded := NEW.status = 'SUCCESSFUL';
    END IF;
    IF succeeded THEN
        WITH counted AS (
            UPDATE reproq_task_runs d SET pending_deps = d.pending_deps - 1
            FROM reproq_run_edges e
            WHERE e.upstream_id = up.id AND d.id = e.downstream_id
              AND d.status = 'WAITING' AND d.pending_deps > 0
            RETURNING d.id, d.pending_deps
        )
        SELECT array_agg(id) INTO released FROM counted WHERE pending_deps = 0;
        IF released IS NULL THEN
            RETURN NULL;
        END IF;
        UPDATE reproq_task_runs d SET
            status = 'READY',
            run_after = now(),
            sort_key = d.sort_key + (extract(epoch FROM now()) * 1000000)::bigint,
            expires_at = CASE WHEN d.expires_at IS NULL OR NOT isfinite(d.expires_at)
                              THEN d.expires_at
                              ELSE now() + (d.expires_at - d.enqueued_at) END,
            status_reason = '',
            args = CASE d.receives
                WHEN 'result' THEN jsonb_build_array(coalesce(
                    (SELECT u.return_value FROM reproq_run_edges e
                     JOIN reproq_task_runs u ON u.id = e.upstream_id
                     WHERE e.downstream_id = d.id ORDER BY e.position LIMIT 1), 'null'::jsonb))
                    || d.args
                WHEN 'results' THEN jsonb_build_array(coalesce(
                    (SELECT jsonb_agg(coalesce(u.return_value, 'null'::jsonb) ORDER BY e.position)
                     FROM reproq_run_edges e JOIN reproq_task_runs u ON u.id = e.upstream_id
                     WHERE e.downstream_id = d.id), '[]'::jsonb)) || d.args
                ELSE d.args END
        WHERE d.id = ANY(released);
        PERFORM pg_notify('reproq', 'r:' || q.queue_name)
        FROM (SELECT DISTINCT queue_name FROM reproq_task_runs WHERE id = ANY(released)) q;
    ELSE
        UPDATE reproq_task_runs d SET
            status = 'CANCELLED',
            finished_at = now(),
            status_reason = 'upstream run ' || up.id || ' ended '
                            || CASE WHEN TG_OP = 'DELETE' THEN 'deleted' ELSE up.status END
        FROM reproq_run_edges e
        WHERE e.upstream_id = up.id AND d.id = e.downstream_id AND d.status = 'WAITING';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER reproq_runs_release_dependents
AFTER UPDATE OF status ON reproq_task_runs
FOR EACH ROW WHEN (
    NEW.has_dependents AND OLD.status IS DISTINCT FROM NEW.status
    AND NEW.status IN ('SUCCESSFUL', 'FAILED', 'CANCELLED', 'EXPIRED')
)
EXECUTE FUNCTION reproq_release_dependents();

CREATE TRIGGER reproq_runs_release_dependents_on_delete
AFTER DELETE ON reproq_task_runs
FOR EACH ROW WHEN (OLD.has_dependents AND OLD.status NOT IN ('SUCCESSFUL'))
EXECUTE FUNCTION reproq_release_dependents();
"""

DROP_RELEASE_DEPENDENTS = """
DROP TRIGGER IF EXISTS reproq_runs_release_dependents ON reproq_task_runs;
DROP TRIGGER IF EXISTS reproq_runs_release_dependents_on_delete ON reproq_task_runs;
DROP FUNCTION IF EXISTS reproq_release_dependents();
"""


class Migration(migrations.Migration):

    dependencies = [
        ('reproq', '0004_enqueue_fast_path'),
    ]

    operations = [
        migrations.CreateModel(
            name='RunEdge',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('upstream_id', models.BigIntegerField()),
                ('downstream_id', models.BigIntegerField()),
                ('position', models.IntegerField(default=0)),
            ],
            options={
                'db_table': 'reproq_run_edges',
            },
        ),
        migrations.AddField(
            model_name='taskrun',
            name='has_dependents',
            field=models.BooleanField(db_default=False, default=False),
        ),
        migrations.AddField(
            model_name='taskrun',
            name='pending_deps',
            field=models.IntegerField(db_default=0, default=0),
        ),
        migrations.AddField(
            model_name='taskrun',
            name='receives',
            field=models.CharField(blank=True, db_default='', default='', max_length=8),
        ),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('pending_deps__gte', 0)), name='reproq_runs_pending_deps_nonnegative'),
        ),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('receives__in', ['', 'result', 'results'])), name='reproq_runs_receives_valid'),
        ),
        migrations.AddIndex(
            model_name='runedge',
            index=models.Index(fields=['downstream_id', 'position'], name='reproq_edges_down'),
        ),
        migrations.AddConstraint(
            model_name='runedge',
            constraint=models.UniqueConstraint(fields=('upstream_id', 'downstream_id'), name='reproq_edge_once'),
        ),
        migrations.RunSQL(RELEASE_DEPENDENTS, DROP_RELEASE_DEPENDENTS),
    ]
