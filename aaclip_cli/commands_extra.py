"""Imports every further command module so that its commands register on `app`."""
