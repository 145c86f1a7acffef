"""Nested parameter trees (dicts and lists of arrays), flattened to dotted names.

Parameters, gradients and optimizer state are plain nested dicts/lists so that every backend
(and safetensors, which stores a flat name -> array mapping) can hold them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Tree = Any


def tree_map(fn: Callable[..., Any], tree: Tree, *others: Tree) -> Tree:
    """Apply ``fn`` leaf-wise to ``tree`` (and the same-shaped ``others``)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v, *(o[i] for o in others)) for i, v in enumerate(tree))
    return fn(tree, *others)


def tree_flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """``{"blocks": [{"w": x}]}`` -> ``{"blocks.0.w": x}`` (insertion order kept)."""
    flat: dict[str, Any] = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    for key, value in items:
        flat.update(tree_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def tree_unflatten(flat: dict[str, Any], like: Tree, prefix: str = "") -> Tree:
    """Inverse of :func:`tree_flatten`, using ``like`` for the structure."""
    if isinstance(like, dict):
        return {
            k: tree_unflatten(flat, v, f"{prefix}.{k}" if prefix else k) for k, v in like.items()
        }
    if isinstance(like, (list, tuple)):
        return type(like)(
            tree_unflatten(flat, v, f"{prefix}.{i}" if prefix else str(i))
            for i, v in enumerate(like)
        )
    return flat[prefix]


def tree_leaves(tree: Tree) -> list[Any]:
    return list(tree_flatten(tree).values())
