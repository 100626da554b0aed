"""Trio daemons around :mod:`shoal.protocol`; one subpackage per daemon."""
