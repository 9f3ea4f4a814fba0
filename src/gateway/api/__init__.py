"""The HTTP edge: Litestar handlers, error rendering, streaming."""
