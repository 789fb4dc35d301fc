"""zeroforge's Hydra configs, as package data: `hydra.searchpath: [pkg://zeroforge.conf]` finds them."""
