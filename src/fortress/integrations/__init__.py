"""Bridges to other toolkits (optional extras, imported on demand: ``fortress.integrations.art``)."""
