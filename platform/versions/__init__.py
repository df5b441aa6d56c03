"""Backbone versions over time: deriving a new version, and migrating devices to it."""
