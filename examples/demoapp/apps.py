from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demoapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.models import User
        from django.db.models.signals import post_save

        from demoapp.models import create_profile

        post_save.connect(create_profile, sender=User, dispatch_uid="demoapp.create_profile")
