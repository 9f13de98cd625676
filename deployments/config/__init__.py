"""Application arguments as read from serve_config.yaml."""
