"""Create users with full model semantics on several workers, then print the report.

    python examples/demo.py [--items 10000] [--workers 2] [--backend process]

Each user's post_save receiver creates a Profile (bulk_create would skip it). Every
1,000th row repeats the username of the row before, so the report shows how failures are
isolated: of the two rows, the one written second fails alone (the later one when
serial; either one when a pool runs both at once), and every other row of its chunk is
still written.
"""

import argparse
import sys
from pathlib import Path

import django
from django.conf import settings

HERE = Path(__file__).resolve().parent


def configure(database: Path) -> None:
    sys.path.insert(0, str(HERE))  # makes demoapp importable, here and in the workers
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "demoapp"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(database)}},
        USE_TZ=True,
    )
    django.setup()


class UserRows:
    """Rows made on demand, as bulkpool reads them; ``len()`` gives the progress bar its total.

    A plain generator works too: the bar then counts without a total.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i in range(self.count):
            name = f"user{i - 1:05d}" if i % 1000 == 999 else f"user{i:05d}"  # a duplicate now and then
            yield {"username": name, "email": f"{name}@example.com"}


def create_user(row):
    from django.contrib.auth.models import User

    return User.objects.create(**row).pk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="process", choices=["serial", "thread", "process"])
    parser.add_argument("--database", type=Path, default=HERE / "demo.sqlite3")
    args = parser.parse_args()

    configure(args.database)
    from demoapp.models import Profile
    from django.contrib.auth.models import User
    from django.core.management import call_command

    import bulkpool

    call_command("migrate", verbosity=0)
    User.objects.all().delete()

    report = bulkpool.run(
        create_user, UserRows(args.items), backend=args.backend, workers=args.workers, progress=True
    )
    print(report)
    print(f"In the database: {User.objects.count():,} users, {Profile.objects.count():,} profiles.")


if __name__ == "__main__":
    main()
