"""The data plugin (see plugin.py): the expression language's parser and optimizer (expression.py)
and its evaluation into an image and then into a memory store (image.py) are separate modules."""

from .plugin import DataPlugin

PLUGIN = DataPlugin
