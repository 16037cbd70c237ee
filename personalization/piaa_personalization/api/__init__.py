"""The gRPC layer: the servicer, the server with its interceptors, API keys and rate limits."""
