"""The leader lease table of `reproq.runtime.peers.LeasePeer` (``REPROQ_RUNTIME["LEADER"] =
"lease"``): leadership as a row with an expiry, which works through a transaction pooler."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('reproq', '0006_limits_nonnegative'),
    ]

    operations = [
        migrations.CreateModel(
            name='Leader',
            fields=[
                ('name', models.TextField(primary_key=True, serialize=False)),
                ('worker_id', models.CharField(max_length=64)),
                ('elected_at', models.DateTimeField()),
                ('expires_at', models.DateTimeField()),
            ],
            options={
                'db_table': 'reproq_leaders',
            },
        ),
    ]
