"""tunewise: baseline -> diagnosis -> optimization -> multi-seed significance -> final model."""
__version__ = "0.1.0"
