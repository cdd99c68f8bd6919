"""The scheduler: request queue, admission and routing to workers."""
