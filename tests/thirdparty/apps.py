from django.apps import AppConfig


class ThirdPartyConfig(AppConfig):
    """A model that two popular third-party apps watch through their own signal receivers.

    The app has no migrations on purpose: its historical model comes from
    django-simple-history, whose generated fields differ between its releases (each Django
    version of the CI matrix gets its own), so the test database creates its tables
    directly.
    """

    name = "tests.thirdparty"
    label = "thirdparty"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from auditlog.registry import auditlog

        from tests.thirdparty.models import Customer

        # As the apps' documentation does it: in ready(), so every process that sets
        # Django up -- bulkpool's workers included -- registers the receivers.
        auditlog.register(Customer)
