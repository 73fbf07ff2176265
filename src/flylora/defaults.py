"""Defaults that command-line parsers need, in a module that imports nothing: `flylora <command>
--help` reads them without importing torch (flylora.models, which uses them, does)."""

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
