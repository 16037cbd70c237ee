"""`make demo`: the journey end to end on this machine, with its bundled album."""
