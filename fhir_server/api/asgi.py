"""ASGI entry point for uvicorn workers: every worker builds its app from the environment."""
from fastapi import FastAPI

from fhir_server.api.http import create_app
from fhir_server.config import Settings


def app_from_env() -> FastAPI:
    return create_app(Settings.from_env())
