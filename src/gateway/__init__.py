"""DGX LLM Chat Gateway: an OpenAI-compatible gateway whose rules come from models.toml."""

__version__ = "0.1.0"
