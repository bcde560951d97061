"""The exit statuses of ``manage.py bulkpool``, as its help states them; one home, since the
running of ``run`` / ``upsert``, the journal views and the command itself all exit with them."""

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
