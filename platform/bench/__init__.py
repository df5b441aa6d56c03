"""`plora bench ...`: measurements of the split, the service, personalization quality and migration."""
