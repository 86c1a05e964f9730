"""fortress (public API re-exports are added once every part exists)."""
