"""Thin Ray entrypoints: build Ray Train trainers and call the `fadrm` library."""
