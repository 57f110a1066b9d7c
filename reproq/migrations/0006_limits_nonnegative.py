"""Concurrency limits are never negative. A limit of 0 holds its key's runs back (a paused key,
as enqueue allows); a negative one, written by hand, means nothing and behaved as 0. Rows that
hold one get 0 first (so they behave as before), then PostgreSQL refuses such limits with a
named constraint."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('reproq', '0005_workflows'),
    ]

    operations = [
        migrations.RunSQL(
            "UPDATE reproq_task_runs SET sem_limit = 0 WHERE sem_limit < 0;"
            "UPDATE reproq_task_runs SET concurrency_limit = 0 WHERE concurrency_limit < 0;",
            migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('sem_limit__isnull', True), ('sem_limit__gte', 0), _connector='OR'), name='reproq_runs_sem_limit_nonnegative'),
        ),
        migrations.AddConstraint(
            model_name='taskrun',
            constraint=models.CheckConstraint(condition=models.Q(('concurrency_limit__isnull', True), ('concurrency_limit__gte', 0), _connector='OR'), name='reproq_runs_concurrency_limit_nonnegative'),
        ),
    ]
