FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dissect_core ./dissect_core
COPY api ./api
COPY workers ./workers
COPY config ./config
COPY manage.py ./
COPY client ./client
RUN pip install --no-cache-dir . ./client && useradd --create-home app && mkdir -p /data /media && chown app /data /media
USER app
# numba compiles the engine's fused CPU loops into ~/.cache/numba once, here rather than in each container
RUN python -c "from dissect_core import fused; fused.warm()"
EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000"]
