"""What the prefill and decode workers share: the shell around their engine."""
