"""The personalization service: residual model, Redis profile store, gRPC gateway."""
