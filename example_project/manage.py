#!/usr/bin/env python
"""The example project's ``manage.py``: run it from the repository root.

``python example_project/manage.py demo`` works on a fresh checkout, without installing
the app: the repository root is put on ``sys.path`` so ``machine_memory`` imports from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Index 1, right after this script's own directory (which holds demo_site and workflows)
# and before site-packages: the checkout wins over an older installed copy of the app.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
