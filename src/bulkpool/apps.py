from django.apps import AppConfig


class BulkpoolConfig(AppConfig):
    """The ``bulkpool`` app: the run journal (``run_id``) and the ``bulkpool`` command.

    ``bulkpool.run`` works without it; journaled runs need it installed and migrated.
    """

    name = "bulkpool"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from bulkpool import checks  # noqa: F401 - registers the system checks
