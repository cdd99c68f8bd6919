"""Runtime shared by every llmos service: settings, errors, telemetry, server bootstrap."""
