"""The example app: an Arvo-style workflow run through ``MachineMemory`` by ``manage.py demo``."""
