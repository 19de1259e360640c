"""C2C customs data-exchange gateway."""

__version__ = "0.1.0"

#: The party id of the gateway in the reference deployment; configuration decides the real one.
DEFAULT_PARTY = "US-CBP"
