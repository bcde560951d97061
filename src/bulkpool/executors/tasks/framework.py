"""Which Tasks framework this project has: ``django.tasks`` (Django 6.0+), else the
``django-tasks`` backport (Django 4.2 and 5.2: ``pip install django-bulkpool[tasks]``).

The same preference as django-tasks-db's: a project on Django 6 whose backend is the
backport's (django-tasks-rq is) still gets ``django.tasks`` here; such a backend is refused
with the reason (``check_backend``) rather than failing at the first enqueue.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from bulkpool.errors import ConfigurationError

INSTALL = (
    "Django's Tasks framework is django.tasks (Django 6.0+) or, before Django 6.0, the "
    "django-tasks package: pip install 'django-bulkpool[tasks]'."
)


_import = importlib.import_module  # one name, for the test without the framework


def module(name: str = "") -> ModuleType:
    """``django.tasks`` or ``django_tasks`` (``name``: one of its submodules, "base"...)."""
    root = "django.tasks" if importlib.util.find_spec("django.tasks") else "django_tasks"
    try:
        return _import(f"{root}.{name}" if name else root)
    except ImportError as error:
        raise ConfigurationError(
            f"backend='tasks' needs Django's Tasks framework, not found. {INSTALL}"
        ) from error


def backend(alias: str) -> Any:
    """The task backend configured as ``alias`` in settings.TASKS; refused with what to do."""
    from django.conf import settings

    tasks = module()
    configured = list(getattr(settings, "TASKS", {}) or {})
    try:
        return tasks.task_backends[alias]
    except Exception as error:
        raise ConfigurationError(
            f"No task backend {alias!r} in settings.TASKS (configured: {', '.join(configured) or 'none'}): "
            f"{str(error).rstrip('.')}. Add it to TASKS, or pass TasksExecutor(backend=...) one of those."
        ) from error


def is_immediate(found: Any) -> bool:
    return isinstance(found, module("backends.immediate").ImmediateBackend)


def check_backend(found: Any, alias: str) -> None:
    """Refuse a backend that would never run the chunks, or that another framework made."""
    if isinstance(found, module("backends.dummy").DummyBackend):
        raise ConfigurationError(
            f"The task backend {alias!r} is Django's DummyBackend, which stores tasks and never "
            "runs them: a bulkpool run over it would wait forever. Use a backend with workers "
            "(django-tasks-db, django-tasks-rq...), or the ImmediateBackend (then the run is serial)."
        )
    base = module("backends.base").BaseTaskBackend
    if not isinstance(found, base):
        raise ConfigurationError(
            f"The task backend {alias!r} ({type(found).__module__}.{type(found).__qualname__}) is not a "
            f"{base.__module__}.BaseTaskBackend, the framework bulkpool uses here: on Django 6.0+ "
            "bulkpool uses django.tasks, so its backend must be one for django.tasks."
        )
