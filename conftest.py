"""Test-wide settings: CI explores the same hypothesis examples every run, so a
red build is reproducible; developers' runs keep exploring new ones."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
