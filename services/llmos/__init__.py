"""llmos: an operating system for large language models, as a suite of gRPC services."""
