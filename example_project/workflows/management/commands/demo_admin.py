"""``manage.py demo_admin``: a superuser for looking at the demo's machines in the admin.

Demo only: the account's password is known to everyone who reads the README.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

if TYPE_CHECKING:
    from django.core.management.base import CommandParser


class Command(BaseCommand):
    help = (
        "Create (or reset) the demo superuser, admin/admin by default, so that after "
        "`manage.py demo` you can `manage.py runserver` and look at the machines in the admin. "
        "Demo only: never use it outside this example project."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin", help="Default: admin.")
        parser.add_argument("--password", default="admin", help="Default: admin.")

    def handle(self, *args: Any, **options: Any) -> None:
        username: str = options["username"]
        password: str = options["password"]
        if not username or not password:
            raise CommandError("--username and --password must not be empty.")
        # The demo migrates on its own; this may run first on a fresh database.
        call_command("migrate", verbosity=0, interactive=False)
        users = get_user_model()._default_manager
        user = users.filter(username=username).first()
        if user is None:
            users.db_manager().create_superuser(username, password=password)
            verb = "Created"
        else:
            user.set_password(password)
            user.is_staff = user.is_superuser = True
            user.save()
            verb = "Reset"
        self.stdout.write(
            f"{verb} the DEMO-ONLY superuser {username!r} with password {password!r}.\n"
            "Run `python example_project/manage.py runserver` and log in at "
            "http://127.0.0.1:8000/admin/ — never use this account outside the demo."
        )
