"""The lab: a pool of rigs on several bench hosts, leased by many CI jobs at once, kept in one
PostgreSQL database (the store's clock and row locks are the only arbiters)."""
