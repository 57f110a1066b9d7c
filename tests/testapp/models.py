"""Models the tests pass to tasks (model instances travel by pk)."""

import uuid

from django.db import models


class Account(models.Model):
    name = models.CharField(max_length=100)


class Document(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    title = models.CharField(max_length=100)
