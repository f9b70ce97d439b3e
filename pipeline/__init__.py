"""Glue between extractors and loaders: config, runs, CLI, sandbox setup."""
