"""Shipped YAML configs (package data), so an installed `lmdm` finds its embedded default."""
