"""Datasets the project trains and evaluates on without any download (see docs/architecture.md)."""

from uniflow.data.shapeworld import (
    COLOURS,
    IMAGE_SIZE,
    NUM_CLASSES,
    SHAPES,
    ShapeWorldDataset,
    ShapeWorldSample,
    class_label,
    class_name,
    render_sample,
    write_shapeworld,
)

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SHAPES",
    "ShapeWorldDataset",
    "ShapeWorldSample",
    "class_label",
    "class_name",
    "render_sample",
    "write_shapeworld",
]
