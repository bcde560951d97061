from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """The models bulkpool's tests write through: signals, overrides, MTI, M2M, UUID keys."""

    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tests.testapp import signals

        signals.connect()
