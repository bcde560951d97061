"""Benchmarks of django-bulkpool against the hand-written alternatives.

Design, from the outside in:

- ``run.py`` is the command line. It imports nothing from Django: it starts one fresh
  ``python -m bench.child`` subprocess per step and reads back one JSON line from each.
- ``child.py`` is one step in its own process: ``prepare`` (migrate, calibrate the
  per-item work, report versions) or ``method`` (empty the user table, time one method
  over a generator of items, count the rows). A fresh process per method means the peak
  RSS it reports belongs to that method alone.
- ``methods.py`` holds the methods: the plain loops, the ProcessPoolExecutor script from
  SPEC.md, ``bulkpool.run`` on each backend, and ``bulk_create`` for reference.
- ``jobs.py`` holds what one item does. It is a module of its own because process
  workers must import the functions they run.
- ``settings.py`` / ``apps.py`` make a minimal Django project: ``auth.User`` plus this
  app, whose signal receivers make every ``save()`` pay for real signals.
"""
