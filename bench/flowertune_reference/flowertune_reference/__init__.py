"""The FlowerTune LLM Code baseline's rounds through Flower, for timing (bench only)."""
