"""The configuration: haip.toml's option models, reading them, masking their secrets, their JSON Schema.

This is the operator's surface (and the server's way in); each layer's own section model is in
``models``. ``references`` finds the Python objects a config names. Imports only ``exceptions``.
"""

from haip_runtime.config.loading import load_config, validate_config
from haip_runtime.config.masking import masked_dump, secret_values
from haip_runtime.config.models import HaipConfig
from haip_runtime.config.schema import json_schema
from haip_runtime.exceptions import ConfigError

__all__ = ["ConfigError", "HaipConfig", "json_schema", "load_config", "masked_dump", "secret_values", "validate_config"]
