"""The service core without gRPC: the request pipeline, the micro-batcher, caches, Triton client, metrics."""
