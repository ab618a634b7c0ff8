"""kefu dialogue service: event-sourced conversations and the answer policy."""
