"""Operator commands: `piaa-admin` (feature-space migration, switch, re-enrolment) and the upgrade drill."""
