"""The kefu command line: up, models pull, kb import, replay."""
