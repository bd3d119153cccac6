# One image for every role of the cluster stack (Ray head/worker, MLflow server, the sweep driver).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pxd ./pxd
COPY orchestrator ./orchestrator
COPY search_spaces ./search_spaces
RUN pip install --no-cache-dir -e '.[postgres,auth]'
