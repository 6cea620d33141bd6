//! Low-rank adapters over any linear layer of an align-model network, in PEFT layout.
