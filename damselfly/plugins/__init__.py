"""Built-in plugins, registered exactly as third-party ones are."""
