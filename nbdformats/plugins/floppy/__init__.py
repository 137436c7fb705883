"""floppy plugin: a FAT disk built from host directories, file data read at request time."""

from .plugin import FloppyPlugin

PLUGIN = FloppyPlugin
