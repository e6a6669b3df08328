"""Reading a YAML file cloister trusts (experiments.yaml): bounded in size and in what its aliases expand
to, and a key given twice in one mapping refused instead of silently dropped."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..files import read_small

MAX_VALUES = 10_000  # in experiments.yaml once its aliases are expanded: a registry is a page or two


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _expanded_size(node: Any, sizes: dict[int, int | None]) -> int:
    """How many values the document holds once its aliases are expanded, each shared node sized once
    (an alias "bomb" nests aliases so that a few lines expand to billions); None marks a node being
    sized, so an alias to a node that contains it is found."""
    if id(node) in sizes:
        size = sizes[id(node)]
        if size is None:
            raise ValueError("an alias refers to a node that contains it")
        return size
    sizes[id(node)] = None
    size = 1 + sum(_expanded_size(child, sizes) for child in _children(node))
    sizes[id(node)] = size
    return size


def _duplicate_key(node: Any, path: tuple[str, ...] = (), seen_nodes: set[int] | None = None) -> tuple[str, int] | None:
    """The first key that a YAML mapping repeats (YAML itself would keep the last one silently); a node
    that aliases share is looked at once."""
    import yaml

    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        return next((d for i, item in enumerate(node.value)
                     if (d := _duplicate_key(item, (*path, str(i)), seen_nodes))), None)
    if not isinstance(node, yaml.MappingNode):
        return None
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key in seen:
            return ".".join((*path, key)), key_node.start_mark.line + 1
        seen.add(key)
        if found := _duplicate_key(value_node, (*path, key), seen_nodes):
            return found
    return None


def read_yaml(file: str) -> Any:
    """The document in ``file``; a key given twice in one mapping, or aliases that expand it beyond
    MAX_VALUES values, is a one-line error."""
    import yaml

    loader = yaml.SafeLoader(read_small(file))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except ValueError as err:
            raise ConfigError(file=file, expected=f"YAML aliases: {err}")
        except RecursionError:
            raise ConfigError(file=file, expected="nested too deeply")
        if size > MAX_VALUES:
            raise ConfigError(file=file, expected=f"YAML aliases expand it to more than {MAX_VALUES} values "
                                                  f"({size:.3g}); write the values out or share fewer")
        if duplicate := _duplicate_key(node):
            key, line = duplicate
            raise ConfigError(file=file, key=key, expected=f"given twice (again at line {line}); keep one")
        return loader.construct_document(node)
    finally:
        loader.dispose()
