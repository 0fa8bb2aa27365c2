"""The REST API, one module per resource; `ROUTES` is what the app mounts."""
