"""Concurrency limits of at least 1: a run written by hand with a limit of 0 or less would wait
for a free slot for ever. Rows that already hold one get the limit 1 first (they run one at a
time), then PostgreSQL refuses such limits with a named constraint."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('reproq', '0005_workflows'),
    ]

    operations = [
        migrations.RunSQL(
            "UPDATE reproq_task_runs SET sem_limit = 1 WHERE sem_limit < 1;"
            "UPDATE reproq_task_runs SET concurrency_limit = 1 WHERE concurrency_limit < 1;",
            migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('sem_limit__isnull', True), ('sem_limit__gte', 1), _connector='OR'), name='reproq_runs_sem_limit_positive'),
        ),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('concurrency_limit__isnull', True), ('concurrency_limit__gte', 1), _connector='OR'), name='reproq_runs_concurrency_limit_positive'),
        ),
    ]
