"""The JSON Schema of haip.toml (``config/haip.schema.json``, for editors), generated from the models.

Each property's description is its attribute docstring in ``models.py``, ``providers.py`` or
``clustering.py``, read from the sources here rather than by pydantic at every import
(``use_attribute_docstrings`` parses each class).
"""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from haip_runtime.config import clustering, models, providers
from haip_runtime.config.models import HaipConfig


def json_schema() -> dict[str, Any]:
    """The JSON Schema of haip.toml, each option described by its attribute docstring."""
    schema = HaipConfig.model_json_schema(mode="validation")
    docs = _attribute_docstrings()
    for name, definition in [(HaipConfig.__name__, schema), *schema.get("$defs", {}).items()]:
        model = vars(models).get(name) or vars(providers).get(name) or vars(clustering).get(name)
        classes = [base.__name__ for base in getattr(model, "__mro__", ())]
        for field, property in definition.get("properties", {}).items():
            found = [docs[cls][field] for cls in classes if field in docs.get(cls, {})]
            if found:
                property["description"] = found[0]
    schema["properties"].pop("base_dir", None)
    schema["title"] = "haip.toml"
    return GenerateJsonSchema().sort(schema)  # keys in pydantic's order again, descriptions included


def _attribute_docstrings() -> dict[str, dict[str, str]]:
    """{class: {attribute: docstring}} for the option classes: a string right after an annotated attribute."""
    docs: dict[str, dict[str, str]] = {}
    modules = (models, providers, clustering)
    nodes = [node for module in modules for node in ast.parse(Path(str(module.__file__)).read_text("utf-8")).body]
    for node in nodes:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = attributes = {}
            for first, second in itertools.pairwise(node.body):
                if (
                    isinstance(first, ast.AnnAssign)
                    and isinstance(first.target, ast.Name)
                    and isinstance(second, ast.Expr)
                    and isinstance(second.value, ast.Constant)
                    and isinstance(second.value.value, str)
                ):
                    attributes[first.target.id] = inspect.cleandoc(second.value.value)
    return docs
