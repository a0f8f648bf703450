"""The configuration: option models (``models``), loading and references to plugin objects."""
