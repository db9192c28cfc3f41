"""Bundled demo material: the synthetic speech corpus and the tiny teacher/student."""
