"""Everything about the NeoPolyp data and its file formats (see docs/contracts.md)."""
