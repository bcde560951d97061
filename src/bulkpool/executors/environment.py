"""Rebuild the caller's Django inside a fresh worker process.

A spawned worker starts with nothing: it gets the caller's ``sys.path``, its settings (the
module name, or the values when ``settings.configure()`` was used) and the *effective*
database settings -- so a run started inside a test writes to the test database.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import cloudpickle
import django
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from bulkpool.errors import ConfigurationError


@dataclass(frozen=True)
class DjangoEnvironment:
    sys_path: list[str]
    settings_module: str | None
    configured_settings: bytes | None  # cloudpickled, when there is no settings module
    databases: dict[str, dict[str, Any]]

    @classmethod
    def capture(cls, *, ship_settings: bool = True) -> DjangoEnvironment:
        module = settings.SETTINGS_MODULE
        return cls(
            sys_path=list(sys.path),
            settings_module=module,
            configured_settings=_pickle_configured_settings() if ship_settings and not module else None,
            databases={alias: dict(connections[alias].settings_dict) for alias in connections},
        )

    def apply(self) -> None:
        """Set Django up as the caller had it (once; a forked worker has it already)."""
        sys.path[:0] = [entry for entry in self.sys_path if entry not in sys.path]
        if not apps.ready:
            if self.settings_module:
                os.environ["DJANGO_SETTINGS_MODULE"] = self.settings_module
            else:
                assert self.configured_settings is not None
                settings.configure(**cloudpickle.loads(self.configured_settings))
            django.setup()
        for alias, effective in self.databases.items():
            settings.DATABASES.setdefault(alias, {}).update(effective)
            connections.settings.setdefault(alias, settings.DATABASES[alias])


def _pickle_configured_settings() -> bytes:
    values = {}
    for name in filter(str.isupper, dir(settings)):
        try:
            values[name] = getattr(settings, name)
        except ImproperlyConfigured:  # e.g. an empty SECRET_KEY: leave it unset there too
            pass
    try:
        return cloudpickle.dumps(values)
    except Exception as error:
        raise ConfigurationError(
            "Settings made with settings.configure() must be sent to spawned worker "
            f"processes, and one of them cannot be pickled ({error}). Use a settings "
            "module (DJANGO_SETTINGS_MODULE), or ProcessExecutor(start_method='fork')."
        ) from error
