"""The Triton side: model repository generation, shared preprocessing, server lifecycle."""
