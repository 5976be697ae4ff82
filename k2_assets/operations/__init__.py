"""Operating K2: alerts to a webhook when something needs a person."""
