"""Transport security, site authentication and differential privacy for the federation."""
