"""The continuous-batching engine: compiled steps over a fixed set of slots, and the
scheduler that admits requests into them. `grok.serve` and `Grok.generate` both drive it."""
