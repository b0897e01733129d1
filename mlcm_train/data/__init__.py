"""Where training samples come from: prompt files, the seeded data order that makes resume exact,
pre-generated trajectory shards, and the demo's coloured-digits image set."""
