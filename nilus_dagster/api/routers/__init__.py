"""One router per area: system (health, info), monitoring, cdc, runtime."""
