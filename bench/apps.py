"""The bench app: it exists to connect signal receivers to User, so saves pay for signals."""

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_save, pre_save


class BenchConfig(AppConfig):
    name = "bench"
    label = "bench"

    def ready(self) -> None:
        from bench import jobs

        pre_save.connect(jobs.stamp_user, sender=settings.AUTH_USER_MODEL)
        post_save.connect(jobs.count_saved, sender=settings.AUTH_USER_MODEL)
