"""OpenAI-compatible serving: ``dsv3 serve`` and :func:`create_app`.

Imported lazily: ``from dsv3.serve.app import create_app`` pulls in FastAPI; this package's own
import stays cheap.
"""
