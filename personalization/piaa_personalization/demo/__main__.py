"""`python -m piaa_personalization.demo`: runs the journey."""

from piaa_personalization.demo.journey import main

raise SystemExit(main())
