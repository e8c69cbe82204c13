FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY agents ./agents
COPY ingest ./ingest
COPY store ./store
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 studyhall && mkdir -p /data && chown studyhall /data
USER studyhall
ENV STUDYHALL_HOST=0.0.0.0 STUDYHALL_DATA_DIR=/data
EXPOSE 8000
CMD ["studyhall", "serve"]
