"""Model code, written for a single device; parallelism is applied from outside (see docs/architecture.md)."""
