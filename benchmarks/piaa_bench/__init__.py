"""Load generators and baselines that measure PIAA against the limit of the machine."""
