# carebroker FHIR server image. docker-compose.yml runs it against PostgreSQL.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fhir_server ./fhir_server
COPY conformance ./conformance
COPY consent ./consent
COPY mappings ./mappings
RUN pip install --no-cache-dir .
ENV CAREBROKER_DATABASE_URL=sqlite:////data/carebroker.db
VOLUME /data
EXPOSE 8080
CMD ["carebroker", "serve", "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
