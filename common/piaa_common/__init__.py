"""Server-side plumbing shared by piaa_triton, piaa_personalization, benchmarks and tests (stdlib only)."""
