"""`python -m piaa_personalization.admin` = `piaa-admin`."""

import sys

from piaa_personalization.admin.cli import main

sys.exit(main())
