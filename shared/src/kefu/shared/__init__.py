"""kefu-shared: the plumbing every kefu service uses (config, logging, the NATS bus, errors, codecs)."""

__version__ = "0.1.0"
